"""The LaViT student (METHODS.md section 2): K latent tokens between the question and the answer, aligned with the
teacher, under the curriculum gate.

Sequence per sample: ``prompt (image + question, generation prompt) + <v-trace_1> .. <v-trace_K> + answer``.

- **continuous** (default, the paper's wording): ``<v-trace_1>`` is a real token (it opens the block); the input at
  latent position ``i + 1`` is the final-norm hidden state of position ``i``, for ``i = 1..K-1``, through
  latent-core's KV-cached differentiable loop (:func:`latent_core.forward_with_latents`: prefill once, one
  single-position step per latent, the answer in one forward on the cache; activation checkpointing works);
- **discrete** (the released code): the K tokens are ordinary trainable vocabulary, one teacher-forced pass.

Losses (Eq. 6, 7, 9), returned by name for :class:`latent_core.LatentTrainer` (weights ``concept_weight`` /
``traj_weight``, lambda = 0.3): ``ntp`` on the answer; ``concept`` = 1 - cos(phi(h_z), V_sem) with ``h_z`` the
hidden state of the **last** latent position; ``traj`` = sum over the K latent positions of KL(A_traj || the
student's real attention row from that position over the image keys, mean over heads and layers, renormalised),
recorded by :func:`latent_core.record_attention` in the same forward (never a probe head). The gate (Eq. 4) adds
``ln(gamma)`` to the logits of the answer queries over the image keys in every language layer
(:func:`latent_core.attention_bias`); latent and prompt rows keep the image. ``gamma`` is set before each step by the
trainer's schedule (:func:`latent_core.gate_schedule`).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from latent_core.attention import attention_bias, gate_bias, record_attention
from latent_core.families import backbone_of, image_token_mask, model_parts
from latent_core.latents import forward_with_latents
from latent_core.trainer import LatentModel
from torch import Tensor

from lavit.losses import ConceptHead, concept_loss, resample_trajectory, trajectory_loss

__all__ = ["LavitStudent", "append_tokens", "merged_grids"]

_PROMPT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def append_tokens(inputs: dict[str, Any], ids: Tensor) -> dict[str, Any]:
    """The prompt batch ``inputs`` with the text tokens ``ids`` ``[B, n]`` appended to every row (attention mask
    ones, text token type): one teacher-forced pass over prompt + ``ids``."""
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], ids], 1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(ids)], 1)
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    return full


def merged_grids(model: Any, inputs: dict[str, Any]) -> list[tuple[int, int]]:
    """Per sample the model's merged image-token grid ``(h, w)`` (``image_grid_thw`` over the spatial merge)."""
    vision = model_parts(model).vision_tower
    merge = getattr(getattr(vision, "config", None), "spatial_merge_size", 2)
    return [(int(h) // merge, int(w) // merge) for _, h, w in inputs["image_grid_thw"].tolist()]


class LavitStudent(LatentModel):
    """The trainer's model: the student backbone, phi, and LaViT's forward (see the module docstring).

    Args:
        backbone: the student VLM (Qwen2.5-VL-like: image tokens in the sequence), the latent tokens already added.
        latent_ids: the token ids of ``<v-trace_1>..<v-trace_K>``.
        teacher_hidden: the teacher's hidden size (V_sem's width).
        mode: ``continuous`` or ``discrete``.
    """

    def __init__(self, backbone: Any, latent_ids: list[int], teacher_hidden: int, mode: str = "continuous") -> None:
        super().__init__(backbone)
        if mode not in ("continuous", "discrete"):
            raise ValueError(f"mode must be 'continuous' or 'discrete', got {mode!r}")
        if mode == "continuous" and len(latent_ids) < 2:
            raise ValueError("continuous mode needs K >= 2 (the first latent token opens the block)")
        self.latent_ids, self.mode = list(latent_ids), mode
        hidden = backbone.config.get_text_config().hidden_size
        self.phi = ConceptHead(hidden, teacher_hidden)
        self.gamma = 1.0  # the gate strength gamma(t), set by the trainer before each step

    @property
    def k(self) -> int:
        return len(self.latent_ids)

    def forward(
        self,
        answer_ids: Tensor,
        labels: Tensor,
        traj_targets: list[Tensor] | None = None,
        traj_grids: list[tuple[int, int]] | None = None,
        vsem_mean: Tensor | None = None,
        **prompt: Any,
    ) -> dict[str, Any]:
        """One training step's losses.

        Args:
            answer_ids, labels: ``[B, T]`` the answer (right padded; labels -100 at padding).
            traj_targets: per sample A_traj's renormalised Top-K target on the teacher's grid (``None``: no L_traj).
            traj_grids: per sample the teacher's merged grid ``(h, w)``.
            vsem_mean: ``[B, d_teacher]`` the teacher's mean-pooled V_sem (``None``: no L_concept).
            **prompt: the processor's output for the LEFT-padded prompts (``input_ids``, ``attention_mask``,
                ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``).
        """
        inputs = {key: prompt[key] for key in _PROMPT_KEYS if prompt.get(key) is not None}
        ids = inputs["input_ids"]
        batch, prompt_len = ids.shape
        total = prompt_len + self.k + answer_ids.shape[1]
        columns = torch.arange(total, device=ids.device)[None].expand(batch, -1)
        image = F.pad(image_token_mask(self.backbone, ids), (0, total - prompt_len))
        latent_rows = (columns >= prompt_len) & (columns < prompt_len + self.k)
        response = columns >= prompt_len + self.k
        with ExitStack() as stack:
            if self.gamma < 1.0:
                stack.enter_context(attention_bias(self.backbone, response, image, gate_bias(self.gamma)))
            recorder = stack.enter_context(record_attention(self.backbone, latent_rows, image))
            if self.mode == "continuous":
                out = forward_with_latents(
                    self.backbone, inputs, self.k - 1, labels=labels, start_ids=self.latent_ids[:1],
                    answer_ids=answer_ids,
                )  # fmt: skip
                ntp, h_z, latents = out.loss, out.latent_hidden[:, -1], out.latents
            else:
                (ntp, h_z), latents = self._discrete(inputs, answer_ids, labels), None
            rows = recorder.weights  # per sample [K, n_image_b]
        aux: dict[str, Tensor] = {}
        if vsem_mean is not None:
            aux["concept"] = concept_loss(self.phi(h_z), vsem_mean)
        if traj_targets is not None:
            grids = merged_grids(self.backbone, inputs)
            terms = [
                trajectory_loss(resample_trajectory(t.to(r.device), g_t, g_s), r)
                for t, g_t, g_s, r in zip(traj_targets, traj_grids, grids, rows, strict=True)
            ]
            aux["traj"] = torch.stack(terms).mean()
        return {"loss": ntp, "aux_losses": aux, "latent_hidden": h_z, "attention_rows": rows, "latents": latents}

    def _discrete(self, inputs: dict[str, Any], answer_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The released code's form: prompt + the K latent tokens + the answer, one teacher-forced pass."""
        batch = answer_ids.shape[0]
        latent = torch.tensor(self.latent_ids, device=answer_ids.device).expand(batch, -1)
        full = append_tokens(inputs, torch.cat([latent, answer_ids], 1))
        out = backbone_of(self.backbone)(**full)  # no LM head over the whole sequence; PEFT-wrapped too
        hidden = out.last_hidden_state
        start = inputs["input_ids"].shape[1]
        h_z = hidden[:, start + self.k - 1]
        predicting = hidden[:, start + self.k - 1 : start + self.k - 1 + answer_ids.shape[1]]
        logits = model_parts(self.backbone).lm_head(predicting).float()
        ntp = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return ntp, h_z
