"""How every LaViT path presents a sample to the model: the system prompt (Appendix C.3) and the Qwen2.5-VL
processor's pixel bounds (Table A1), so that the teacher build (``build-lavit-15k``), training (``lavit train``),
``lavit generate``, ``latent eval --method lavit`` and ``lavit analyze`` ask the same thing and see the same merged
patch grid. The build's manifest and the student's ``latent_stage.json`` record them (:attr:`InputSettings.as_dict`);
training refuses a student whose settings differ from the build's (:func:`check_inputs`).

Without the bounds the processor keeps its own (the released Qwen2.5-VL: 3,136 .. 12,845,056 pixels), so a 1920 x
1080 image gives 2,691 merged tokens instead of Table A1's 1,222.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from latent_core.cli import UserError

__all__ = ["MAX_PIXELS", "MIN_PIXELS", "SYSTEM_PROMPT", "InputSettings", "SettingsMismatchError", "check_inputs"]

SYSTEM_PROMPT = (
    "You are an expert multimodal large language model. You process visual information through specialized latent "
    "tokens to ensure precise alignment between visual perception and textual reasoning."
)
"""Appendix C.3's system prompt ("System Prompt for LVR Alignment"), word for word: the one definition."""
MIN_PIXELS = 200_704
"""Table A1: min_pixels 200,704 (256 x 28 x 28)."""
MAX_PIXELS = 1_003_520
"""Table A1: max_pixels 1,003,520 (1280 x 28 x 28)."""


class SettingsMismatchError(UserError, ValueError):
    """Teacher data built with other inputs (pixel bounds, system prompt) than the student's (the message names
    both)."""


def _pixel_processor(processor: Any) -> Any:
    """The image processor of a Qwen2-VL / Qwen2.5-VL processor (pixel-count bounds in ``size``), else ``None``."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or not hasattr(image_processor, "merge_size"):
        return None
    size = getattr(image_processor, "size", None)
    return image_processor if _bounds(size)[1] is not None else None


def _bounds(size: Any) -> tuple[int | None, int | None]:
    """``(shortest_edge, longest_edge)`` of a ``size`` dict or transformers ``SizeDict`` (the pixel-count bounds)."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return get("shortest_edge"), get("longest_edge")


@dataclass(frozen=True)
class InputSettings:
    """How LaViT presents a sample to the model in every path (see the module docstring).

    Attributes:
        system_prompt: the system turn (Appendix C.3's by default); ``None`` or ``""``: the chat template's default.
        min_pixels, max_pixels: the Qwen2.5-VL processor's resize bounds (Table A1); ``None``: the processor's own.
            Other processors (no pixel-count bounds) ignore them.
    """

    system_prompt: str | None = SYSTEM_PROMPT
    min_pixels: int | None = MIN_PIXELS
    max_pixels: int | None = MAX_PIXELS

    def apply(self, processor: Any) -> InputSettings:
        """Set these pixel bounds on ``processor``'s image processor (in place: every later call, and the processor
        a stage saves, resizes within them) and return the settings it now has (:meth:`resolved`)."""
        image_processor = _pixel_processor(processor)
        if image_processor is not None and (self.min_pixels is not None or self.max_pixels is not None):
            low, high = _bounds(image_processor.size)
            image_processor.size = {
                "shortest_edge": int(self.min_pixels if self.min_pixels is not None else low),
                "longest_edge": int(self.max_pixels if self.max_pixels is not None else high),
            }
        return self.resolved(processor)

    def resolved(self, processor: Any) -> InputSettings:
        """The system prompt and the bounds ``processor`` resizes within now (``None`` for a processor without
        pixel-count bounds): what a manifest or a stage records."""
        image_processor = _pixel_processor(processor)
        low, high = _bounds(image_processor.size) if image_processor is not None else (None, None)
        return InputSettings(self.system_prompt or None, low, high)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def own(cls) -> InputSettings:
        """The model's own: its processor's pixel bounds and its chat template's default system prompt (e.g. a base
        trained without LaViT's prompt, as the shapes bases are)."""
        return cls(None, None, None)

    @classmethod
    def recorded(cls, info: dict[str, Any] | None) -> InputSettings:
        """The settings a manifest or ``latent_stage.json`` recorded (``info``: its ``inputs``). One written before
        they were recorded (``None``) used the processor's own bounds and the chat template's default system
        prompt."""
        info = info or {}
        return cls(info.get("system_prompt"), info.get("min_pixels"), info.get("max_pixels"))


def check_inputs(built: InputSettings, student: InputSettings, data: Any) -> None:
    """Refuse (:class:`SettingsMismatchError`) a student whose pixel bounds or system prompt differ from those the
    teacher data in ``data`` was built with (its manifest's ``inputs``): the merged grids of A_traj and of the
    student would differ for every image, or the student would be asked another prompt than the teacher answered.
    A bound the build did not record (a teacher without pixel bounds) is not compared."""
    mismatched = [
        name
        for name in ("min_pixels", "max_pixels", "system_prompt")
        if (name == "system_prompt" or getattr(built, name) is not None)
        and getattr(built, name) != getattr(student, name)
    ]
    if mismatched:
        shown = ", ".join(f"{n}={getattr(built, n)!r} (student: {getattr(student, n)!r})" for n in mismatched)
        raise SettingsMismatchError(
            f"the teacher data in {data} was built with {shown}: train the student with the build's settings "
            "(--min-pixels / --max-pixels / --system-prompt) or rebuild the teacher data with the student's"
        )
