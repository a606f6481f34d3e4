"""Continuous latent reasoning on a KV cache: K latent steps, then ordinary ``model.generate``.

Coconut's "continuous thought" (and LaViT's continuous ``<v-trace>`` tokens, LaRe's refocused latents z_t) feed the
model's own last hidden state back as the next input embedding. The reference code re-runs the whole prefix for every
latent and every answer token; here (as in CODI) the prompt is prefilled once and every latent step is ONE
single-position forward on the KV cache::

    prompt (left padded) + start_ids  ->  prefill once, on a DynamicCache
    for t = 1..K:   z_t = step_fn(h_{t-1}, state)       h_0 = final-norm output at the last prompt position
                    feed z_t as one `inputs_embeds` position on the cache -> h_t
    end_ids (e.g. <eot>), then model.generate(...) continues from the cache (greedy / sampling kwargs honoured)

"Hidden state" is the output of the language model's final norm (what feeds ``lm_head``), read from
``last_hidden_state`` of the model without its head (``model.model``), so no logits are computed while thinking.

Design decisions (all covered by tests/latent_core/test_latents.py):

- **Positions are explicit.** Every forward gets ``position_ids``: ``cumsum(attention_mask) - 1`` (what ``generate``
  uses for left padding), and for Qwen2.5-VL the 3-D M-RoPE positions of the prompt from ``get_rope_index`` (fed the
  processor's ``mm_token_type_ids``) with every later position = its 1-D text position + the sample's
  ``rope_delta``. The model's ``rope_deltas`` attribute is neither read nor written, and ``generate`` gets the full
  ``position_ids`` too, so it never recomputes positions (ANCHORS.md: without this, the cached loop drifts).
- **Mllama** reaches the image through cross-attention: the prompt's ``cross_attention_mask`` is extended for every new
  position by repeating its last row (as ``MllamaForConditionalGeneration`` does while generating); the image keys and
  values stay in the cross-attention layers of the cache, so ``pixel_values`` are used at prefill only.
- **Adaptive halting keeps the batch rectangular by masking.** ``halt_fn(z_t, z_{t-1}, t)`` is called after latent t
  for 2 <= t < K. A sample that halts at t keeps z_1..z_t: z_t is held back, the sample's remaining latent slots get
  ``attention_mask = 0`` (invisible keys, outputs ignored) and its position counter stops, and z_t goes into the last
  latent slot of the batch, at the position it would have had alone. The result equals running that sample alone
  with ``num_latents=t`` (up to float noise). ``latents[b, t:]`` is zero for such a sample; ``num_steps[b] = t``.
  When every sample has halted, the loop stops early.
- **Continuing ``generate`` from the cache**: everything but the very last input position is fed by this module; the
  last one (the last ``end_ids`` token, or the last latent if ``end_ids`` is empty) is left for ``generate``, which
  then sees ``input_ids`` covering the whole sequence (the latent positions hold a placeholder id, the pad id, which
  id-based logits processors such as ``repetition_penalty`` will see), the full 2-D ``attention_mask``, the full
  ``position_ids`` and ``past_key_values``; when the last position is a latent it also gets ``inputs_embeds`` (a
  zero-copy expand of the last latent: ``generate`` uses only the uncached tail of it). Use ``max_new_tokens``
  (``max_length`` would count the prompt and latents).
- **Per-step cost**: ids, mask and position buffers are allocated once and every forward gets views of them; while
  no position is masked (no padding, no halted sample) the forwards get ``attention_mask=None`` (plain causal), so
  the model builds no mask per step. A latent step costs about one cached decode step without ``lm_head``
  (``uv run apps/cli bench latent-loop``).
- **What a step function sees** (:class:`LatentState`; LaRe's refocusing, METHODS.md section 3): besides the
  final-norm hidden state, optionally every layer's hidden state at the last position (``step_hidden_states``),
  that position's attention over chosen keys, e.g. the image tokens, mean over heads and layers (``step_attention``:
  the loop owns the recorder and hands over each step's row only), and the projector-output image features
  (``step_image_features``).
- **Training** (:func:`forward_with_latents`) runs the same single-position steps with gradients. Under activation
  checkpointing (reentrant or not) transformers would drop the KV cache in training mode; here each checkpointed
  decoder layer keeps it (:class:`_CachedLayerCheckpoint`): the layer's cache before the call goes in as an input of
  the checkpointed function and the cache after it comes out as an output, so a 1.3k-token prefill keeps only each
  layer's input, gradients reach earlier positions' keys and values, and the recompute in backward writes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from latent_core.families import _unwrap_peft, model_parts
from latent_core.zero3 import full_shape

__all__ = [
    "HaltFn",
    "LatentForward",
    "LatentGeneration",
    "LatentState",
    "StepFn",
    "distance_halt",
    "forward_with_latents",
    "generate_with_latents",
]

# Processor outputs with one entry per text position: extended by this module for the positions it adds.
# Everything else the processor returns (pixel_values, image_grid_thw, image_sizes, aspect_ratio_ids, ...) is passed
# to the prefill forward unchanged.
_PER_POSITION = ("input_ids", "attention_mask", "mm_token_type_ids", "cross_attention_mask", "position_ids")


@dataclass
class LatentState:
    """What a ``step_fn`` sees besides the hidden state (the context LaRe's extractor needs).

    Attributes:
        step: 1-based index t of the latent being produced (1..K).
        latents: ``[B, t-1, d_embed]`` the latents z_1..z_{t-1} produced so far (zero after a halted sample's last
            latent). In ``generate_with_latents`` it is a view of the output buffer: ``clone()`` it to keep it.
        active: ``[B]`` bool, False for samples that have halted (their ``hidden`` row is meaningless).
        hidden_states: with ``step_hidden_states=True``, the model's ``hidden_states`` output (embedding output and
            every decoder layer, as the model returns them with ``output_hidden_states=True``) at the last position,
            each ``[B, d]``; else ``None``.
        attention: with ``step_attention``: per sample ``[n_keys_b]``, the attention of the last position (the one
            whose hidden state this is) over the selected keys (e.g. the image tokens), mean over heads and the
            ``attention_layers`` (LaRe's saliency map before pooling); this step's row only. Else ``None``.
        image_features: with ``step_image_features=True``: per sample ``[n_b, d]``, the image features after the
            projector as the language model received them at prefill (:func:`latent_core.capture_image_features`;
            LaRe's window takes these). Else ``None``.
        past_key_values: the KV cache (prompt, start ids and latent positions so far).
        attention_mask: ``[B, L]`` 2-D mask over the cached positions (0 at padding and at halted samples' slots).
    """

    step: int
    latents: Tensor
    active: Tensor
    hidden_states: tuple[Tensor, ...] | None
    past_key_values: Any
    attention_mask: Tensor
    attention: list[Tensor] | None = None
    image_features: list[Tensor] | None = None


StepFn = Callable[[Tensor, LatentState], Tensor]
"""``step_fn(hidden [B, d], state: LatentState) -> [B, d_embed]``: maps the final-norm hidden state of the last
position to the next input embedding. Default: identity (Coconut's continuous thought; needs d == d_embed)."""

HaltFn = Callable[[Tensor, Tensor, int], Tensor]
"""``halt_fn(latent_t [B, d_embed], latent_prev [B, d_embed], t) -> BoolTensor [B]``: True stops a sample after
latent t (it keeps z_1..z_t). Called for 2 <= t < K."""


@dataclass
class LatentGeneration:
    """Output of :func:`generate_with_latents`.

    Attributes:
        sequences: ``[B, T]`` the generated answer token ids (after the latents and ``end_ids``); samples that
            finished early are padded as ``generate`` pads them.
        latents: ``[B, K, d_embed]`` the latents fed to the model (z_1..z_K); zeros beyond ``num_steps[b]`` for a
            halted sample.
        num_steps: ``[B]`` number of latents of each sample (K unless ``halt_fn`` stopped it earlier).
        generate_output: what ``model.generate`` returned (a ``GenerateOutput`` with ``return_dict_in_generate=True``,
            e.g. for ``output_logits``); its ``sequences`` cover the whole sequence, latent positions as pad ids.
    """

    sequences: Tensor
    latents: Tensor
    num_steps: Tensor
    generate_output: Any = None


@dataclass
class LatentForward:
    """Output of :func:`forward_with_latents`.

    Attributes:
        logits: ``[B, T, V]`` where ``logits[:, i]`` predicts ``answer_ids[:, i]`` (already aligned with ``labels``,
            no shift needed); ``None`` without ``answer_ids``.
        latents: ``[B, K, d_embed]`` the latents z_1..z_K fed to the model (with gradients).
        latent_hidden: ``[B, K, d]`` final-norm hidden states at the K latent positions (``latent_hidden[:, -1]`` is
            the "hidden state of the last latent token", LaViT's h_z).
        loss: mean cross-entropy of ``logits`` against ``labels`` (ignoring -100), ``None`` without labels.
    """

    logits: Tensor | None
    latents: Tensor
    latent_hidden: Tensor
    loss: Tensor | None = None


def distance_halt(threshold: float, metric: str = "cosine") -> HaltFn:
    """A ``halt_fn`` that stops a sample once its successive latents are closer than ``threshold`` (LaRe, Table 4).

    ``metric``: ``"cosine"`` (1 - cosine similarity), ``"l1"`` or ``"l2"`` (mean absolute / root-mean-square
    difference per dimension, so thresholds do not scale with the width).
    """
    if metric not in ("cosine", "l1", "l2"):
        raise ValueError(f"unknown halting metric {metric!r}; choose 'cosine', 'l1' or 'l2'")

    def halt(latent: Tensor, previous: Tensor, step: int) -> Tensor:
        a, b = latent.float(), previous.float()
        if metric == "cosine":
            distance = 1 - F.cosine_similarity(a, b, dim=-1)
        elif metric == "l1":
            distance = (a - b).abs().mean(-1)
        else:
            distance = (a - b).pow(2).mean(-1).sqrt()
        return distance < threshold

    return halt


class _LatentRun:
    """The bookkeeping of one batched latent run: KV cache, ids, 2-D mask, positions and per-sample counters.

    Buffers are allocated once for the longest possible sequence and every forward gets views of them, so a latent
    step costs one model call plus a few tiny tensor writes.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_latents: int,
        start_ids: Sequence[int] | None,
        end_ids: Sequence[int] | None,
        step_hidden_states: bool,
        extra: int = 0,
        step_attention: Tensor | str | None = None,
        attention_layers: Sequence[int] | None = None,
        step_image_features: bool = False,
    ) -> None:
        if not isinstance(num_latents, int) or isinstance(num_latents, bool) or num_latents < 0:
            raise ValueError(f"num_latents must be an int >= 0, got {num_latents!r}")
        self.base = _unwrap_peft(model)
        self.parts = model_parts(self.base)
        self.inner = getattr(self.base, "model", None)
        if not isinstance(self.inner, nn.Module):
            raise ValueError(f"{type(self.base).__name__} has no `.model` (the model without its LM head)")
        if "input_ids" not in inputs:
            raise ValueError("inputs must hold `input_ids` (pass what the processor or tokenizer returned)")
        if "position_ids" in inputs:
            raise ValueError("inputs must not hold `position_ids`: positions are computed from the attention mask")
        ids = inputs["input_ids"]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
        self.device = ids.device
        self.batch, prompt_len = ids.shape
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(ids.device, torch.long)
        _check_left_padded(mask)
        weight = self.parts.input_embeddings.weight
        self.embed_dim, self.embed_dtype = full_shape(weight)[-1], weight.dtype  # ZeRO-3: the local shape is (0,)
        self.step_hidden_states = step_hidden_states
        self.step_attention, self.attention_layers = step_attention, attention_layers
        self.step_image_features = step_image_features
        self.recorder: Any = None
        self.image_features: Any = None
        self.num_latents = num_latents

        start = _id_tensor(start_ids, "start_ids", self.device)
        self.end = _id_tensor(end_ids, "end_ids", self.device)
        self.prefix_len = prompt_len + len(start)
        self.capacity = self.prefix_len + num_latents + len(self.end) + extra
        self.placeholder = self._placeholder_id()
        self.ids = torch.full((self.batch, self.capacity), self.placeholder, dtype=torch.long, device=self.device)
        self.ids[:, :prompt_len] = ids
        self.ids[:, prompt_len : self.prefix_len] = start
        self.mask = torch.ones((self.batch, self.capacity), dtype=torch.long, device=self.device)
        self.mask[:, :prompt_len] = mask
        self.valid = self.mask[:, : self.prefix_len].sum(-1)  # [B] real positions of each sample so far
        # No padding and nothing masked yet: forwards get attention_mask=None (plain causal), which spares the
        # model building and checking a mask at every step. Cleared as soon as a slot is masked.
        self.dense = bool(mask.all())

        # Everything else the processor returned goes to the prefill forward only.
        self.prefill_kwargs = {k: v for k, v in inputs.items() if k not in _PER_POSITION and v is not None}
        self.cross_mask = inputs.get("cross_attention_mask")
        if self.cross_mask is not None:  # mllama: one row per text position; new positions repeat the last row
            self.cross_row = self.cross_mask[:, -1:]
            self.cross_mask = torch.cat([self.cross_mask, self.cross_row.expand(-1, len(start), -1, -1)], 1)

        self.mrope, prefix_pos, self.delta = self._prefix_positions(inputs, len(start))
        shape = (3, self.batch, self.capacity) if self.mrope else (self.batch, self.capacity)
        self.pos = torch.zeros(shape, dtype=torch.long, device=self.device)
        self.pos[..., : self.prefix_len] = prefix_pos
        self.cache = DynamicCache(config=self.base.config)
        self.use_cache = True  # False while checkpointed layers keep the cache (only silences transformers' warning)
        self.length = 0  # positions in the cache

    @contextmanager
    def step_inputs(self) -> Iterator[None]:
        """While the latent steps run: the recorder of each step's attention row (``step_attention``: the query
        rows are the positions whose hidden states feed ``step_fn``, prompt end to last-but-one latent) and the
        capture of the projector-output image features (``step_image_features``)."""
        from latent_core.attention import record_attention
        from latent_core.capture import capture_image_features

        with ExitStack() as stack:
            if self.step_attention is not None and self.num_latents:
                queries = torch.zeros((self.batch, self.capacity), dtype=torch.bool, device=self.device)
                queries[:, self.prefix_len - 1 : self.prefix_len - 1 + self.num_latents] = True
                keys = self.step_attention
                if isinstance(keys, Tensor):
                    keys = keys.to(self.device, torch.bool)
                self.recorder = stack.enter_context(
                    record_attention(self.base, queries, keys, layers=self.attention_layers)
                )
            if self.step_image_features:
                self.image_features = stack.enter_context(
                    capture_image_features(self.base, self.ids[:, : self.prefix_len])
                )
            yield

    def _placeholder_id(self) -> int:
        sources = (getattr(self.base, "generation_config", None), self.base.config, self.base.config.get_text_config())
        for source in sources:
            pad = getattr(source, "pad_token_id", None)
            if isinstance(pad, int):
                return pad
        return 0

    def _prefix_positions(self, inputs: dict[str, Any], n_start: int) -> tuple[bool, Tensor, Tensor]:
        """Positions of prompt + start ids as ``(is_mrope, positions, delta)``; a later position = text pos + delta."""
        prefix_mask = self.mask[:, : self.prefix_len]
        zero = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        has_vision = inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None
        rope_index = getattr(self.inner, "get_rope_index", None)
        if not (has_vision and callable(rope_index)):
            return False, (prefix_mask.cumsum(-1) - 1).clamp(min=0), zero
        # Qwen2.5-VL: 3-D M-RoPE positions over the image, text positions + rope_delta after it (ANCHORS.md).
        types = inputs.get("mm_token_type_ids")
        if types is None:
            cfg, ids = self.base.config, inputs["input_ids"]
            types = (ids == cfg.image_token_id).long() + 2 * (ids == getattr(cfg, "video_token_id", -1)).long()
        types = torch.cat([types, types.new_zeros((self.batch, n_start))], dim=1)
        kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
        positions, deltas = rope_index(
            self.ids[:, : self.prefix_len], mm_token_type_ids=types, attention_mask=prefix_mask, **kwargs
        )
        return True, positions.to(self.device), deltas.reshape(-1).to(self.device)

    def _forward(self, length: int, **kwargs: Any) -> Any:
        """Run the model without its head on slots [length, length + n) of the buffers, on the cache."""
        start, stop = self.length, self.length + length
        if self.cross_mask is not None:
            kwargs["cross_attention_mask"] = (
                self.cross_mask[:, start:stop]
                if stop <= self.cross_mask.shape[1]
                else self.cross_row.expand(-1, length, -1, -1)
            )
        if self.step_hidden_states:
            kwargs["output_hidden_states"] = True
        mask, pos = None if self.dense else self.mask[:, :stop], self.pos[..., start:stop]
        if torch.is_grad_enabled():  # autograd may save them, and the buffers are written again later
            mask, pos = None if mask is None else mask.clone(), pos.clone()
            kwargs = {k: v.clone() if k == "input_ids" else v for k, v in kwargs.items()}
        out = self.inner(
            attention_mask=mask,
            position_ids=pos,
            past_key_values=self.cache,
            use_cache=self.use_cache,
            **kwargs,
        )
        self.length = stop
        return out

    def prefill(self, upto: int) -> Any:
        """The first ``upto`` slots (prompt + start ids) with the images, in one forward."""
        return self._forward(upto, input_ids=self.ids[:, :upto], **self.prefill_kwargs)

    def feed(self, embeds: Tensor, valid: Tensor | None = None, ids: Tensor | None = None) -> Any:
        """Feed ``embeds [B, n, d]`` at the next n slots (``ids``: their token ids, else the placeholder).

        ``valid [B]`` False masks a sample's slots (its halted latent slots) and does not advance its positions.
        """
        n, start = embeds.shape[1], self.length
        if ids is not None:
            self.ids[:, start : start + n] = ids
        if valid is not None:
            self.mask[:, start : start + n] = valid[:, None]
            self.dense = self.dense and bool(valid.all())
        self.pos[..., start : start + n] = (self.valid + self.delta)[:, None] + torch.arange(n, device=self.device)
        self.valid = self.valid + (n if valid is None else n * valid.long())
        return self._forward(n, inputs_embeds=embeds)

    def embed(self, ids: Tensor) -> Tensor:
        """Input embeddings of ``ids [n]`` shared by the batch -> ``[B, n, d]``."""
        return self.parts.input_embeddings(ids).unsqueeze(0).expand(self.batch, -1, -1)

    def check_latent(self, z: Any) -> Tensor:
        if not isinstance(z, Tensor) or z.shape != (self.batch, self.embed_dim):
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"step_fn returned {got}, expected ({self.batch}, {self.embed_dim}) = [batch, width of the model's "
                "input embeddings]; project the hidden state to the embedding width"
            )
        return z.to(self.embed_dtype)

    def state(self, step: int, latents: Tensor, active: Tensor, out: Any) -> LatentState:
        hidden_states = tuple(h[:, -1] for h in out.hidden_states) if self.step_hidden_states else None
        attention = None
        if self.recorder is not None:  # this step's row only (take() forgets it)
            attention = [rows[-1] for rows in self.recorder.take()]
        return LatentState(
            step=step,
            latents=latents,
            active=active,
            hidden_states=hidden_states,
            past_key_values=self.cache,
            attention_mask=self.mask[:, : self.length],
            attention=attention,
            image_features=None if self.image_features is None else self.image_features.features,
        )

    def generate_inputs(self, final_latent: Tensor | None, final_token: Tensor | None) -> dict[str, Any]:
        """``generate``'s inputs: the whole sequence, whose last slot (a latent or a token) is not yet cached."""
        last = self.length
        total = last + 1
        if final_token is not None:
            self.ids[:, last] = final_token
        if final_latent is not None or final_token is not None:  # a new slot (not the prompt's last token)
            self.pos[..., last] = self.valid + self.delta
            self.mask[:, last] = 1
        kwargs: dict[str, Any] = dict(
            input_ids=self.ids[:, :total],
            attention_mask=self.mask[:, :total],
            position_ids=self.pos[..., :total],
            past_key_values=self.cache,
        )
        if final_latent is not None:  # generate slices the uncached tail, so a zero-copy expand suffices
            kwargs["inputs_embeds"] = final_latent[:, None].expand(self.batch, total, self.embed_dim)
        if self.cross_mask is not None:
            rows = total - self.cross_mask.shape[1]
            kwargs["cross_attention_mask"] = torch.cat([self.cross_mask, self.cross_row.expand(-1, rows, -1, -1)], 1)
        return kwargs


def _id_tensor(ids: Sequence[int] | None, name: str, device: torch.device) -> Tensor:
    if ids is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    out = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    if out.ndim != 1:
        raise ValueError(f"{name} must be a flat list of token ids (shared by every sample), got shape {out.shape}")
    return out


def _check_left_padded(mask: Tensor) -> None:
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be 2-D [batch, seq], got shape {tuple(mask.shape)}")
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()) or not bool(mask[:, -1].all()):
        raise ValueError(
            "the batch is not left padded (an attention_mask row has a 0 after a 1): latent steps are appended after "
            "the last column, so pad on the left (tokenizer.padding_side = 'left', or processor.tokenizer"
            ".padding_side = 'left')"
        )


def _halt_mask(stop: Any, batch: int) -> Tensor:
    if not isinstance(stop, Tensor) or stop.shape != (batch,):
        got = tuple(stop.shape) if isinstance(stop, Tensor) else type(stop).__name__
        raise ValueError(f"halt_fn must return a bool tensor of shape ({batch},), got {got}")
    return stop.bool()


def _identity(hidden: Tensor, state: LatentState) -> Tensor:
    return hidden


def generate_with_latents(
    model: nn.Module,
    inputs: dict[str, Any],
    num_latents: int,
    step_fn: StepFn | None = None,
    halt_fn: HaltFn | None = None,
    start_ids: Sequence[int] | None = None,
    end_ids: Sequence[int] | None = None,
    *,
    step_hidden_states: bool = False,
    step_attention: Tensor | str | None = None,
    attention_layers: Sequence[int] | None = None,
    step_image_features: bool = False,
    **generate_kwargs: Any,
) -> LatentGeneration:
    """Prefill the prompt once, run ``num_latents`` continuous latent steps on the KV cache, then ``generate``.

    Args:
        model: a model of a supported family (PEFT-wrapped too).
        inputs: what the processor / tokenizer returned for a LEFT-padded batch (``input_ids``, ``attention_mask``,
            ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, ``cross_attention_mask``, ...).
        num_latents: K >= 0 latent steps per sample (0: plain generation after the delimiters).
        step_fn: ``step_fn(hidden [B, d], state: LatentState) -> [B, d_embed]`` (:data:`StepFn`); identity by
            default. Called on the whole batch; rows of halted samples are ignored.
        halt_fn: ``halt_fn(z_t, z_{t-1}, t) -> BoolTensor [B]``, adaptive halting (:data:`HaltFn`,
            :func:`distance_halt`); ``None``: every sample runs K steps.
        start_ids: token ids appended to every prompt before the latents (e.g. ``<bot>``).
        end_ids: token ids after the latents (e.g. ``<eot>``), before the answer.
        step_hidden_states: run the latent steps with ``output_hidden_states=True`` and hand the per-layer states of
            the last position to ``step_fn`` as ``state.hidden_states``.
        step_attention: keys whose attention ``step_fn`` gets each step as ``state.attention``: a bool key mask
            ``[B, prompt_len]`` (e.g. ``image_token_mask(model, input_ids)``) or ``"image"`` (mllama's
            cross-attended image); the loop owns the recorder and hands over each step's row only.
        attention_layers: the layers averaged for ``state.attention`` (default: every layer of the kind).
        step_image_features: hand ``step_fn`` the projector-output image features as ``state.image_features``.
        **generate_kwargs: for ``model.generate`` (``max_new_tokens``, ``do_sample``, ``temperature``,
            ``return_dict_in_generate``, ``output_logits``, ...).

    Returns:
        :class:`LatentGeneration`: answer ids, latents ``[B, K, d_embed]`` (zero beyond a halted sample's steps),
        per-sample step counts.
    """
    step_fn = step_fn or _identity
    for key in ("past_key_values", "input_ids", "inputs_embeds", "attention_mask", "position_ids"):
        if key in generate_kwargs:
            raise ValueError(f"generate_kwargs must not set {key!r}: generate_with_latents builds it")
    if generate_kwargs.get("use_cache") is False:
        raise ValueError("use_cache=False cannot continue from the latent KV cache")
    for key in ("num_beams", "num_return_sequences"):
        if generate_kwargs.get(key, 1) != 1:
            raise ValueError(
                f"{key}={generate_kwargs[key]} would expand the batch after the latent cache is built; repeat the "
                "inputs instead (e.g. input_ids.repeat_interleave(n, 0) for every entry) and sample"
            )
    with torch.no_grad():
        run = _LatentRun(
            model, inputs, num_latents, start_ids, end_ids, step_hidden_states,
            step_attention=step_attention, attention_layers=attention_layers, step_image_features=step_image_features,
        )  # fmt: skip
        batch, k, end = run.batch, num_latents, run.end
        latents = torch.zeros((batch, k, run.embed_dim), dtype=run.embed_dtype, device=run.device)
        num_steps = torch.full((batch,), k, dtype=torch.long, device=run.device)
        final_latent = final_token = None
        if k == 0:
            if len(end) == 0:  # the prompt's last token is generate's
                run.prefill(run.prefix_len - 1)
            else:
                run.prefill(run.prefix_len)
                if len(end) > 1:
                    run.feed(run.embed(end[:-1]), ids=end[:-1])
                final_token = end[-1]
        else:
            with run.step_inputs():
                out = run.prefill(run.prefix_len)
                hidden = out.last_hidden_state[:, -1]
                active = torch.ones(batch, dtype=torch.bool, device=run.device)
                all_active = True
                final = torch.zeros((batch, run.embed_dim), dtype=run.embed_dtype, device=run.device)
                for t in range(1, k + 1):
                    z = run.check_latent(step_fn(hidden, run.state(t, latents[:, : t - 1], active, out)))
                    latents[:, t - 1] = z if all_active else torch.where(active[:, None], z, latents.new_zeros(()))
                    if t == k:  # the last latent goes into the final slot
                        final = z if all_active else torch.where(active[:, None], z, final)
                        break
                    if halt_fn is not None and t >= 2:
                        stop = _halt_mask(halt_fn(z, latents[:, t - 2], t), batch) & active
                        if bool(stop.any()):
                            final = torch.where(stop[:, None], z, final)
                            num_steps = torch.where(stop, t, num_steps)
                            active, all_active = active & ~stop, False
                            if not bool(active.any()):
                                break
                    out = run.feed(z[:, None], valid=None if all_active else active)
                    hidden = out.last_hidden_state[:, -1]
            if len(end) == 0:
                final_latent = final
            else:  # final latent slot + end ids but the last one in one forward; the last end id is generate's
                run.feed(
                    torch.cat([final[:, None], run.embed(end[:-1])], 1),
                    ids=torch.cat([end.new_tensor([run.placeholder]), end[:-1]]),
                )
                final_token = end[-1]
        kwargs = run.generate_inputs(final_latent, final_token)
        total = kwargs["input_ids"].shape[1]
        output = run.base.generate(**kwargs, **generate_kwargs)
    sequences = output if isinstance(output, Tensor) else output.sequences
    return LatentGeneration(
        sequences=sequences[:, total:],
        latents=latents,
        num_steps=num_steps,
        generate_output=None if isinstance(output, Tensor) else output,
    )


class _CachedLayerCheckpoint:
    """A decoder layer's checkpoint function that keeps the KV cache (installed by :func:`_checkpointing_with_cache`).

    transformers' checkpointed layers drop ``past_key_values`` in training because the recompute in backward would
    write the cache a second time. Here the cache layer's state before the call is restored for the recompute and
    put back afterwards (no double write), and its key / value tensors before and after the call are an input and
    an output of the checkpointed function: with reentrant checkpointing (whose forward runs without grad) the
    tensors the cache holds afterwards are the checkpoint's outputs, so gradients from later positions reach this
    call. Keyword tensors that need grad (mllama's ``cross_attention_states``) become inputs too.
    """

    def __init__(self, checkpoint: Callable[..., Any], cache: Any, index: int) -> None:
        self.checkpoint, self.cache, self.index = checkpoint, cache, index
        self.__wrapped__ = checkpoint

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        layers = getattr(self.cache, "layers", ())
        if self.index >= len(layers):  # a cache that creates layers lazily: keep it, without checkpointing
            return function(*args)
        layer = layers[self.index]
        before = dict(layer.__dict__)
        prev = [before.get(name) for name in ("keys", "values")]
        prev = prev if all(isinstance(t, Tensor) for t in prev) else []
        grad_keys: list[str] = []
        grad_values: list[Tensor] = []
        if isinstance(function, functools.partial):  # transformers' partial(forward, layer, **kwargs)
            grad_keys = [k for k, v in function.keywords.items() if isinstance(v, Tensor) and v.requires_grad]
            grad_values = [function.keywords[k] for k in grad_keys]
            keywords = {k: v for k, v in function.keywords.items() if k not in grad_keys}
            function = functools.partial(function.func, *function.args, **keywords)
        n_args, n_keys = len(args), len(grad_keys)
        calls, wrote = [0], [False]

        def run(*inputs: Any) -> tuple[Any, ...]:
            calls[0] += 1
            replay = calls[0] > 1
            if replay:  # the recompute in backward: the cache as it was before this call, and back afterwards
                after = dict(layer.__dict__)
                layer.__dict__.clear()
                layer.__dict__.update(before)
                if prev:
                    layer.keys, layer.values = inputs[n_args + n_keys :]
            try:
                out = function(*inputs[:n_args], **dict(zip(grad_keys, inputs[n_args : n_args + n_keys], strict=True)))
                keys = getattr(layer, "keys", None)
                if not replay:
                    wrote[0] = isinstance(keys, Tensor) and keys is not (prev[0] if prev else None)
                written = (layer.keys, layer.values) if wrote[0] else ()
            finally:
                if replay:
                    layer.__dict__.clear()
                    layer.__dict__.update(after)
            return (out, *written)

        # The outputs are the very tensors the cache now holds: under reentrant checkpointing autograd attaches the
        # checkpoint's backward to them, so gradients from later positions reach this call.
        return self.checkpoint(run, *args, *grad_values, *prev, **kwargs)[0]


# Cache layers that hold only `keys` / `values` tensors, replaced (never written in place) by each update.
_KEY_VALUE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


@contextmanager
def _checkpointing_with_cache(base: nn.Module, cache: Any) -> Iterator[bool]:
    """While a latent run lasts, the checkpointed decoder layers keep ``cache`` (:class:`_CachedLayerCheckpoint`).

    Uses transformers' own hooks: the per-instance ``_gradient_checkpointing_func`` it calls and the
    ``_can_checkpoint_with_cache`` flag that makes it pass ``past_key_values`` on. Yields whether any layer is
    checkpointed (the forwards then pass ``use_cache=False``, which only silences transformers' warning: the cache
    given is still written)."""
    installed = []
    for index, layer in enumerate(model_parts(base).decoder_layers):
        original = layer.__dict__.get("_gradient_checkpointing_func")
        if original is None or not (layer.training and getattr(layer, "gradient_checkpointing", False)):
            continue
        kind = type(cache.layers[index]).__name__ if index < len(getattr(cache, "layers", ())) else None
        if kind not in (None, *_KEY_VALUE_LAYERS):
            raise ValueError(
                f"forward_with_latents under activation checkpointing keeps key/value cache layers only; layer "
                f"{index}'s cache is a {kind} (state updated in place), whose recompute would read later states: "
                "train this model without activation checkpointing"
            )
        layer._gradient_checkpointing_func = _CachedLayerCheckpoint(original, cache, index)
        layer._can_checkpoint_with_cache = True
        installed.append((layer, original))
    try:
        yield bool(installed)
    finally:
        for layer, original in installed:
            layer._gradient_checkpointing_func = original
            layer.__dict__.pop("_can_checkpoint_with_cache", None)


def forward_with_latents(
    model: nn.Module,
    inputs: dict[str, Any],
    num_latents: int,
    labels: Tensor | None = None,
    step_fn: StepFn | None = None,
    start_ids: Sequence[int] | None = None,
    end_ids: Sequence[int] | None = None,
    answer_ids: Tensor | None = None,
    *,
    step_hidden_states: bool = False,
    step_attention: Tensor | str | None = None,
    attention_layers: Sequence[int] | None = None,
    step_image_features: bool = False,
) -> LatentForward:
    """The training counterpart of :func:`generate_with_latents`: the same K latent steps WITH gradients, then the
    teacher-forced answer in one forward on the cache.

    Sequence per sample: ``prompt + start_ids + z_1..z_K + end_ids + answer_ids``. Each latent step is one
    single-position forward on the KV cache (the same numbers as the generate path); z_K, ``end_ids`` and the answer
    go in one forward. Gradients flow from the answer loss into the latents, ``step_fn`` and the model. No halting
    (training runs K steps). Works under activation checkpointing, reentrant or not: the checkpointed layers keep the
    cache (:func:`_checkpointing_with_cache`) and the gradients equal the plain loop's.

    Args:
        model, inputs, num_latents, step_fn, start_ids, end_ids, step_hidden_states, step_attention,
            attention_layers, step_image_features: as in :func:`generate_with_latents` (``state.attention`` and
            ``state.image_features`` carry gradients here).
        labels: ``[B, T]`` targets aligned with ``answer_ids`` (usually ``answer_ids`` with -100 at padding);
            gives ``loss``, the mean cross-entropy over the labels that are not -100.
        answer_ids: ``[B, T]`` answer tokens, teacher-forced; right padding is fine (padding after an answer cannot
            change it; label it -100). ``None``: only the latents and their hidden states are computed.

    Returns:
        :class:`LatentForward` (answer logits aligned with ``answer_ids``, latents, latent hidden states, loss).
    """
    step_fn = step_fn or _identity
    if labels is not None and answer_ids is None:
        raise ValueError("labels need answer_ids (the teacher-forced tokens the labels are aligned with)")
    n_answer = 0 if answer_ids is None else answer_ids.shape[-1]
    run = _LatentRun(
        model, inputs, num_latents, start_ids, end_ids, step_hidden_states, extra=max(n_answer - 1, 0),
        step_attention=step_attention, attention_layers=attention_layers, step_image_features=step_image_features,
    )  # fmt: skip
    batch, k, end = run.batch, num_latents, run.end
    if answer_ids is not None:
        if answer_ids.ndim != 2 or answer_ids.shape[0] != batch:
            raise ValueError(f"answer_ids must be [batch={batch}, T], got shape {tuple(answer_ids.shape)}")
        if labels is not None and labels.shape != answer_ids.shape:
            raise ValueError(
                f"labels {tuple(labels.shape)} must have the shape of answer_ids {tuple(answer_ids.shape)}"
            )
        answer_ids = answer_ids.to(run.device)

    # The loop's recorder is entered before the checkpoint functions are wrapped: theirs is then the outer one and
    # sees transformers' own call (the keyword tensors it moves into the checkpoint's inputs).
    with run.step_inputs(), _checkpointing_with_cache(run.base, run.cache) as checkpointed:
        run.use_cache = not checkpointed
        out = run.prefill(run.prefix_len)
        hidden = out.last_hidden_state[:, -1]
        latents: list[Tensor] = []
        latent_hidden: list[Tensor] = []
        active = torch.ones(batch, dtype=torch.bool, device=run.device)
        for t in range(1, k + 1):
            so_far = torch.stack(latents, 1) if latents else hidden.new_zeros((batch, 0, run.embed_dim))
            z = run.check_latent(step_fn(hidden, run.state(t, so_far, active, out)))
            latents.append(z)
            if t < k:
                out = run.feed(z[:, None])
                hidden = out.last_hidden_state[:, -1]
                latent_hidden.append(hidden)

        # One forward over [z_K, end_ids, answer_ids[:-1]]; position j of `seq_hidden` predicts the token after
        # it.
        pieces, piece_ids = [], []
        if k:
            pieces.append(latents[-1][:, None])
            piece_ids.append(end.new_full((batch, 1), run.placeholder))
        if len(end):
            pieces.append(run.embed(end))
            piece_ids.append(end.expand(batch, -1))
        if n_answer > 1:
            pieces.append(run.parts.input_embeddings(answer_ids[:, :-1]))
            piece_ids.append(answer_ids[:, :-1])
        seq_hidden = hidden[:, None]  # the last cached position, which predicts the first tail slot
        if pieces:
            tail = run.feed(torch.cat(pieces, 1), ids=torch.cat(piece_ids, 1)).last_hidden_state
            seq_hidden = torch.cat([seq_hidden, tail], 1)
            if k:
                latent_hidden.append(tail[:, 0])
    logits = loss = None
    if n_answer:
        before = (1 if k else 0) + len(end)  # tail slots before the answer
        logits = run.parts.lm_head(seq_hidden[:, before : before + n_answer])
        if labels is not None:
            flat = logits.float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(flat, labels.to(logits.device).reshape(-1), ignore_index=-100)
    hidden_size = hidden.shape[-1]
    return LatentForward(
        logits=logits,
        latents=torch.stack(latents, 1) if latents else hidden.new_zeros((batch, 0, run.embed_dim)),
        latent_hidden=torch.stack(latent_hidden, 1) if latent_hidden else hidden.new_zeros((batch, 0, hidden_size)),
        loss=loss,
    )
