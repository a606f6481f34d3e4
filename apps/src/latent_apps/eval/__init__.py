"""Evaluation: answer extraction, evaluation methods (``plain`` and those the method packages register) and the
resumable benchmark runner behind ``latent eval``.

- :mod:`~latent_apps.eval.extract`: :func:`extract_answer`, :func:`extract_choice`, :func:`extract_yes_no`,
  :func:`extract_number`, :func:`infer_kind`, :func:`is_correct`;
- :mod:`~latent_apps.eval.methods`: :func:`register_method`, :func:`get_method`, :func:`registered_methods`,
  :class:`Generation`, :class:`PlainMethod`, :func:`build_inputs`, :func:`build_prompt_text`;
- :mod:`~latent_apps.eval.runner`: :func:`run_eval`, :func:`eval_command`, :func:`register_reader`,
  :func:`summarize_records`, :func:`read_samples_jsonl`.
"""

from __future__ import annotations

from latent_core.exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "extract_answer": "extract",
    "extract_choice": "extract",
    "extract_number": "extract",
    "extract_yes_no": "extract",
    "infer_kind": "extract",
    "is_correct": "extract",
    "EvalMethod": "methods",
    "Generation": "methods",
    "PlainMethod": "methods",
    "UnknownMethodError": "methods",
    "build_inputs": "methods",
    "build_prompt_text": "methods",
    "get_method": "methods",
    "register_method": "methods",
    "registered_methods": "methods",
    "READERS": "runner",
    "eval_command": "runner",
    "read_samples_jsonl": "runner",
    "register_reader": "runner",
    "run_eval": "runner",
    "summarize_records": "runner",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
