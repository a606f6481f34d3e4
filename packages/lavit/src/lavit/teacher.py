"""LaViT's teacher signals (METHODS.md section 2, LaViT-SFT-15K): one fused, batched teacher pass per batch.

For each (image, question) the teacher (a Qwen2.5-VL: its processor's merged patch grid places A_traj and the bbox)
answers greedily with its KV cache; while it decodes, the attention rows of the chosen query tokens over the image
keys are recorded (:func:`latent_core.record_attention`: only those rows, never the L x L matrix and never eager
attention), and the visual features V_sem are read at prefill (:func:`latent_core.capture_hidden_states` at the
image positions). From the rows:

- **A_traj** (Eq. 2-3): ``S_j`` = mean over the chosen layers, heads and query tokens of the attention to image
  token ``j``; min-max normalised; Top-K sparsified (``k = 8``); the training target is the Top-K part renormalised
  to sum to 1 (:func:`trajectory_target`).
- **V_sem**: the hidden states at the image positions, after the final norm (``post``, the paper's "last-layer
  hidden states") or the last decoder layer's output before it (``pre``, the released code). The image precedes
  the question and attention is causal, so V_sem does not depend on the question: a property of the image.

Options (:class:`TeacherOptions`), each a command-line flag: ``queries`` ``answer`` (the answer tokens, the paper)
or ``after-image`` (every token after the last image token: question, template and answer, the released code);
``layers`` ``all`` or ``last:N``; ``vsem_norm`` ``post`` or ``pre``; ``top_k``. Preset ``paper`` = answer / all /
post; ``authors`` = after-image / last:8 / pre (ANCHORS.md: what the released code does).

Answer queries are the answer tokens that were fed to the model: with an end-of-sequence token every answer token
is (the last one predicted it); an answer cut by ``max_new_tokens`` loses its last token's row (and is flagged
``truncated``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from latent_core.cli import UserError
from torch import Tensor

__all__ = [
    "PRESETS",
    "OptionError",
    "TeacherOptions",
    "TeacherOutput",
    "bbox_cell_weights",
    "layer_indices",
    "merged_grid",
    "resized_size",
    "teacher_pass",
    "trajectory_target",
]

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"queries": "answer", "layers": "all", "vsem_norm": "post"},
    "authors": {"queries": "after-image", "layers": "last:8", "vsem_norm": "pre"},
}


class OptionError(UserError, ValueError):
    """A teacher option that does not exist (the message names the flag and its choices)."""


@dataclass(frozen=True)
class TeacherOptions:
    """How the teacher signals are computed (see the module docstring); ``preset`` fills the first three."""

    queries: str = "answer"
    layers: str = "all"
    vsem_norm: str = "post"
    top_k: int = 8
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.queries not in ("answer", "after-image"):
            raise OptionError(f"--queries must be 'answer' or 'after-image', got {self.queries!r}")
        if self.vsem_norm not in ("post", "pre"):
            raise OptionError(f"--vsem-norm must be 'post' or 'pre', got {self.vsem_norm!r}")
        if self.top_k < 1:
            raise OptionError(f"--top-k must be >= 1, got {self.top_k}")
        layer_indices(self.layers, 1_000_000)  # the spec's syntax

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TeacherOptions:
        if name not in PRESETS:
            raise OptionError(f"unknown preset {name!r}; choose {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_indices(spec: str, num_layers: int) -> tuple[int, ...]:
    """``all`` -> every layer; ``last:N`` -> the last N (all of them when the model has fewer)."""
    if spec == "all":
        return tuple(range(num_layers))
    kind, _, count = spec.partition(":")
    if kind != "last" or not count.isdigit() or int(count) < 1:
        raise OptionError(f"--layers must be 'all' or 'last:N' (N >= 1), got {spec!r}")
    return tuple(range(max(num_layers - int(count), 0), num_layers))


# ---------------------------------------------------------------------------------------------------------------
# Eq. 2-3 and the bbox on the merged patch grid
# ---------------------------------------------------------------------------------------------------------------


def trajectory_target(scores: Tensor, top_k: int = 8) -> dict[str, Tensor]:
    """A_traj from ``scores`` ``[n]`` (S_j, Eq. 2): ``dense`` the min-max normalised map (Eq. 3), ``indices`` /
    ``values`` its Top-K entries (largest first), ``target`` the Top-K part renormalised to sum to 1 (the KL
    target of L_traj; a flat map spreads it evenly over the first ``k``)."""
    scores = scores.float()
    low, high = scores.min(), scores.max()
    dense = (scores - low) / (high - low) if float(high - low) > 0 else torch.zeros_like(scores)
    k = min(top_k, dense.numel())
    values, indices = torch.topk(dense, k)
    target = torch.zeros_like(dense)
    total = float(values.sum())
    target[indices] = values / total if total > 0 else torch.full_like(values, 1.0 / k)
    return {"dense": dense, "indices": indices, "values": values, "target": target}


def resized_size(
    image_size: tuple[int, int], min_pixels: int, max_pixels: int, patch: int = 14, merge: int = 2
) -> tuple[int, int]:
    """``(width, height)`` the Qwen2-VL / Qwen2.5-VL processor resizes an image of ``image_size = (w, h)`` to:
    transformers' own ``smart_resize`` (multiples of ``patch * merge`` = 28, area within min / max pixels)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    width, height = image_size
    new_height, new_width = smart_resize(
        height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return new_width, new_height


def merged_grid(image_grid_thw: Tensor | list[int], merge: int = 2) -> tuple[int, int, int]:
    """The merged token grid ``(t, h, w)`` of one image: the processor's patch grid with 2x2 patches merged."""
    t, h, w = (int(v) for v in image_grid_thw)
    return t, h // merge, w // merge


def bbox_cell_weights(
    bbox: list[float], image_size: tuple[int, int], resized: tuple[int, int], grid: tuple[int, int]
) -> Tensor:
    """The fraction of each merged cell (row-major ``[h * w]``, as the image tokens are ordered) covered by
    ``bbox = [x0, y0, x1, y1]`` (pixels of the original image), mapped onto the resized image exactly: the box
    scaled by ``resized / original`` per axis, each cell ``resized / grid`` pixels wide."""
    width, height = image_size
    new_w, new_h = resized
    rows, cols = grid
    x0, y0, x1, y1 = bbox
    sx, sy = new_w / width, new_h / height
    cell_w, cell_h = new_w / cols, new_h / rows
    xs = torch.arange(cols, dtype=torch.float64) * cell_w
    ys = torch.arange(rows, dtype=torch.float64) * cell_h
    cover_x = ((torch.clamp(xs + cell_w, max=x1 * sx) - torch.clamp(xs, min=x0 * sx)).clamp(min=0)) / cell_w
    cover_y = ((torch.clamp(ys + cell_h, max=y1 * sy) - torch.clamp(ys, min=y0 * sy)).clamp(min=0)) / cell_h
    return (cover_y[:, None] * cover_x[None, :]).reshape(-1).float()


# ---------------------------------------------------------------------------------------------------------------
# The fused pass
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TeacherOutput:
    """One sample's teacher signals.

    Attributes:
        answer: the teacher's greedy answer (special tokens dropped).
        answer_ids: its token ids (end of sequence excluded).
        truncated: the answer hit ``max_new_tokens`` without an end-of-sequence token.
        scores: ``[n_image_tokens]`` S_j (Eq. 2) before normalisation.
        queries: how many query rows were averaged.
        v_sem: ``[n_image_tokens, d]`` the hidden states at the image positions (``vsem_norm``).
        grid: the merged token grid ``(t, h, w)`` (``h * w * t == n_image_tokens``).
        cell_px: pixels per merged cell side in the resized image (patch size x merge size: 28 for Qwen2.5-VL), so
            the resized image is ``(w * cell_px, h * cell_px)``.
    """

    answer: str
    answer_ids: list[int]
    truncated: bool
    scores: Tensor
    queries: int
    v_sem: Tensor
    grid: tuple[int, int, int]
    cell_px: int = 28


def _end_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(source, name, None)
            ids.update(value if isinstance(value, list | tuple) else [value] if isinstance(value, int) else [])
    return ids


@torch.no_grad()
def teacher_pass(
    model: Any,
    processor: Any,
    images: list[Any],
    questions: list[str],
    options: TeacherOptions,
    system: str | None = None,
) -> list[TeacherOutput]:
    """The fused teacher pass over one batch: answer (greedy, KV cache), attention rows of the query tokens over
    the image keys, and V_sem at prefill, for every sample (see the module docstring).

    Args:
        model: the teacher (a Qwen2.5-VL-like model whose image tokens sit in the sequence), eval mode.
        processor: its processor.
        images: one PIL image per sample.
        questions: the user text of each sample (:func:`latent_core.prompts.question_text`).
        options: :class:`TeacherOptions`.
        system: the system turn before each question (LaViT's Appendix C.3 prompt; ``None``: the template's).

    Raises:
        ValueError: the model takes its image through cross-attention, or its processor gives no merged patch grid
            (``image_grid_thw``: A_traj and the bbox live on that 2-D grid; a LLaVA's flat run of image tokens has
            none).
    """
    from latent_core.attention import record_attention
    from latent_core.capture import capture_hidden_states, select_tokens
    from latent_core.families import image_token_id, image_token_mask, model_parts
    from latent_core.prompts import encode_chats, render_prompts

    parts = model_parts(model)
    if parts.family.images_via == "cross_attention":
        raise ValueError(
            f"the LaViT teacher needs the image tokens in the sequence (Qwen2.5-VL, LLaVA); {parts.family.name} "
            "reaches its image through cross-attention"
        )
    tokenizer = getattr(processor, "tokenizer", processor)
    chats = render_prompts(processor, questions, [1] * len(questions), system=system)
    inputs = encode_chats(processor, chats, [[image] for image in images], padding_side="left")
    if inputs.get("image_grid_thw") is None:
        raise ValueError(
            f"the LaViT teacher needs a Qwen2.5-VL processor's merged patch grid (image_grid_thw) to place A_traj and "
            f"the bbox on the image; {parts.family.name}'s processor gives none"
        )
    inputs = inputs.to(model.device)
    ids = inputs["input_ids"]
    batch, prompt_len = ids.shape
    image = image_token_mask(model, ids)
    if not bool(image.any(-1).all()):
        raise ValueError("a prompt has no image tokens: the processor did not expand the image")
    queries = torch.zeros_like(image)
    if options.queries == "after-image":
        last_image = prompt_len - 1 - image.flip(-1).int().argmax(-1)  # [B]
        queries = torch.arange(prompt_len, device=ids.device)[None] > last_image[:, None]
    n_layers = len(parts.decoder_layers)
    layers = layer_indices(options.layers, n_layers)
    hidden_layer = -1 if options.vsem_norm == "post" else n_layers - 1
    with (
        record_attention(model, queries, image, layers=layers, extend_queries=True) as rows,
        capture_hidden_states(model, select_tokens(image_token_id(model)), layer=hidden_layer) as states,
    ):
        out = model.generate(**inputs, max_new_tokens=options.max_new_tokens, do_sample=False)
    generated = out[:, prompt_len:]
    ends = _end_ids(model, tokenizer)
    grids = inputs.get("image_grid_thw")
    image_processor = getattr(processor, "image_processor", None)
    merge = getattr(image_processor, "merge_size", 2)
    cell_px = getattr(image_processor, "patch_size", 14) * merge
    results = []
    for b in range(batch):
        tokens = generated[b].tolist()
        n = next((i for i, token in enumerate(tokens) if token in ends), None)
        truncated = n is None
        answer_ids = tokens if n is None else tokens[:n]
        fed = len(answer_ids) - (1 if truncated else 0)  # the last token of a cut answer was never fed
        prompt_rows = int(queries[b].sum())
        sample_rows = rows.weights[b][: prompt_rows + fed]  # [n_queries, n_image_tokens]
        scores = sample_rows.float().mean(0) if len(sample_rows) else torch.zeros(int(image[b].sum()))
        grid = merged_grid(grids[b], merge)
        results.append(
            TeacherOutput(
                answer=tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
                answer_ids=answer_ids,
                truncated=truncated,
                scores=scores.cpu(),
                queries=len(sample_rows),
                v_sem=states.states[b].cpu(),
                grid=grid,
                cell_px=cell_px,
            )
        )
    return results


def alignment(target_dense: Tensor, cell_weights: Tensor) -> float:
    """The share of the A_traj mass inside the bbox: ``sum_j dense_j * covered_j / sum_j dense_j`` (0 when the map
    is flat)."""
    total = float(target_dense.sum())
    return float((target_dense * cell_weights).sum()) / total if total > 0 and math.isfinite(total) else 0.0
