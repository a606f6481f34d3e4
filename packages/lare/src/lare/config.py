"""LaRe's model configuration: the refocusing loop and the extractor (METHODS.md section 3, paper 003).

The paper's equations and several values were lost in extraction, so every value the paper does not give is a
**choice**: a documented default, saved with the checkpoint (``lare_config.json``) and overridable.

- T = 4 refocusing iterations (Section 3.1, Table 7's saturation point).
- Sliding window (Section 3.1, Table 8): a w x w sum-pooling window over the 16x16 saliency map, stride 1; the
  sizes compared were lost (**choice**: ``window=None`` = half the grid side, w = 8 on the 16x16 grid of
  CLIP ViT-L/14 at 224 px; ``stride = 1``).
- Extractor (Appendix B): 2 layers, 12 self-attention and 12 cross-attention heads, hidden 1536, then a GLU and an
  FFN. How the hidden states of every layer become the query (Eq. 3's input) is a **choice**: ``query="layers"``,
  learned softmax weights over every layer's hidden state at the current position (``"last"``: the final-norm state
  only). The latent-state sequence its self-attention runs over is the sequence of these queries, one per
  iteration so far (**choice**).
- ``<bot>`` / ``<eot>`` delimit the latents (Section 3.1, "Inference Phase").
- Table 3's ablations: ``extractor=False`` (z_t is the hidden state), ``sliding_window=False`` (V_local is the whole
  image); the loss ablations are the training config's weights.
- Adaptive halting (Table 4): ``halt`` ``cos`` | ``l1`` | ``l2`` with ``threshold`` (None: always T iterations).

:class:`LareTrainConfig` holds the training arguments of the four stages (Appendix A) and the loss weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from latent_core.trainer import LatentTrainingArguments

__all__ = ["CONFIG_NAME", "HALT_METRICS", "LareConfig", "LareTrainConfig"]

CONFIG_NAME = "lare_config.json"
HALT_METRICS = {"cos": "cosine", "l1": "l1", "l2": "l2"}
"""``--halt`` names and the :func:`latent_core.distance_halt` metric each one is."""


@dataclass
class LareConfig:
    """The refocusing loop and the extractor (see the module docstring for the source of every default)."""

    num_latents: int = 4
    """T refocusing iterations (paper: 4); with halting, the most a sample takes. 0: no latent steps at all
    (``[V, X_q, <bot>, <eot>, answer]``), the no-latent SFT control of ``reproduce lare``."""
    window: int | None = None
    """Side w of the sliding window in grid cells; None: half the grid side (8 on 16x16; **choice**)."""
    stride: int = 1
    """Stride of the sliding window (**choice**: 1)."""
    extractor_layers: int = 2
    """Appendix B: 2 layers."""
    extractor_heads: int = 12
    """Appendix B: 12 heads in self- and cross-attention."""
    extractor_hidden: int = 1536
    """Appendix B: hidden dimension 1536."""
    query: str = "layers"
    """``layers``: learned softmax weights over every layer's hidden state (**choice**); ``last``: the final-norm
    state only."""
    extractor: bool = True
    """Table 3's "w/o Extractor" when False: z_t is the LLM's final-norm hidden state itself (Coconut's continuous
    thought), no refocusing."""
    sliding_window: bool = True
    """Table 3's "w/o Sliding Window" when False: V_local is every image token, not the best window's."""
    bot_token: str = "<bot>"
    eot_token: str = "<eot>"
    halt: str | None = None
    """Adaptive halting metric (Table 4): ``cos``, ``l1`` or ``l2``; None: always ``num_latents`` iterations."""
    threshold: float = 0.05
    """Halt a sample once the distance between z_t and z_{t-1} is below this (with ``halt``)."""

    def __post_init__(self) -> None:
        if self.num_latents < 0:
            raise ValueError(f"num_latents must be >= 0, got {self.num_latents}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 (or None: half the grid side), got {self.window}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.extractor_hidden % self.extractor_heads:
            raise ValueError(
                f"extractor_hidden {self.extractor_hidden} is not divisible by extractor_heads {self.extractor_heads}"
            )
        if self.query not in ("layers", "last"):
            raise ValueError(f"query must be 'layers' or 'last', got {self.query!r}")
        if self.halt is not None and self.halt not in HALT_METRICS:
            raise ValueError(f"halt must be one of {', '.join(HALT_METRICS)} (or None), got {self.halt!r}")

    def window_for(self, grid: int) -> int:
        """The window side on a ``grid x grid`` map (None: ``grid // 2``); refuses a window larger than the grid."""
        window = self.window if self.window is not None else max(grid // 2, 1)
        if window > grid:
            raise ValueError(f"the sliding window ({window}x{window}) is larger than the {grid}x{grid} image grid")
        return window

    def save(self, directory: str | Path) -> None:
        Path(directory, CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> LareConfig:
        """The config saved in ``directory``: ``FileNotFoundError`` when it is missing, a ``ValueError`` naming the
        file when it is malformed (bad JSON, unknown fields, wrongly typed or out-of-range values)."""
        path = Path(directory, CONFIG_NAME)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} a LaRe checkpoint (`lare init` writes one)?")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known) if isinstance(raw, dict) else ["<not an object>"]
        if unknown:
            raise ValueError(f"{path}: unknown fields {', '.join(unknown)}")
        types = {"num_latents": int, "window": (int, type(None)), "stride": int, "extractor_layers": int,
                 "extractor_heads": int, "extractor_hidden": int, "query": str, "extractor": bool,
                 "sliding_window": bool, "bot_token": str, "eot_token": str,
                 "halt": (str, type(None)), "threshold": (int, float)}  # fmt: skip
        wrong = [
            k for k, v in raw.items() if not isinstance(v, types[k]) or (isinstance(v, bool) and types[k] is not bool)
        ]
        if wrong:
            raise ValueError(f"{path}: wrongly typed values for {', '.join(wrong)}")
        try:
            return cls(**raw)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def replace(self, **overrides: Any) -> LareConfig:
        """A copy with ``overrides`` (``None`` values are ignored, so CLI options can be passed as they come)."""
        return LareConfig(**{**asdict(self), **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class LareTrainConfig(LatentTrainingArguments):
    """Training arguments of LaRe's four stages (Appendix A; METHODS.md section 3). Lost values are **choices**.

    - AdamW, weight decay 0.05, 1 epoch per stage, bf16 on GPU (Appendix A); batch 256 (stage I) and 128 (II-IV)
      are set per stage by ``lare train`` (``--batch-size`` overrides).
    - Learning rates were lost (**choice**: LLaVA-1.5's 1e-3 for stage I, 2e-5 after).
    - Loss weights were grid-searched and lost (**choice**: 0.1 for each alignment term, 0.5 for L_img and L_text);
      0 switches a term off (the ablations).
    """

    weight_decay: float = field(default=0.05, metadata={"help": "Appendix A: AdamW weight decay 0.05."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Appendix A: one epoch per stage."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Lost (choice): 2e-5 (stage I: 1e-3)."})
    align_text_weight: float = field(default=0.1, metadata={"help": "L_align, latents vs reasoning text (choice)."})
    align_visual_weight: float = field(default=0.1, metadata={"help": "L_align, latents vs anchors (choice)."})
    img_weight: float = field(default=0.5, metadata={"help": "L_img, diffusion reconstruction (choice)."})
    text_weight: float = field(default=0.5, metadata={"help": "L_text, the 32-token prefix (choice)."})
    temperature: float = field(default=0.07, metadata={"help": "InfoNCE temperature tau (choice)."})
    text_prefix: int = field(default=32, metadata={"help": "Appendix A: the text prefix is 32 tokens."})
    crop_size: int = field(default=128, metadata={"help": "Side the window's crop is resized to (choice)."})
