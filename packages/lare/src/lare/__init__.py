"""LaRe: multimodal reasoning via latent refocusing.

Public API: :class:`LareConfig`, :class:`LareModel` with :func:`compose` (``lare init``), :func:`from_llava` and
:func:`load_lare`; :class:`Extractor`; :func:`generate_answers` (KV-cached refocusing iterations with adaptive
halting, then the answer); the window functions of :mod:`lare.refocus`.
"""

from __future__ import annotations

from latent_core.exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "LareConfig": "config",
    "Extractor": "extractor",
    "LareModel": "model",
    "RefocusStep": "model",
    "add_image_token": "model",
    "compose": "model",
    "compose_config": "model",
    "from_llava": "model",
    "wrap_llava": "model",
    "load_lare": "model",
    "LareAnswers": "generate",
    "generate_answers": "generate",
}

__all__ = ["__version__", *_EXPORTS]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
