"""Attention-bias gating and attention-row recording through one registered attention implementation.

transformers dispatches every language attention layer through ``AttentionInterface`` (by the name in
``config._attn_implementation``) and builds its masks through ``AttentionMaskInterface``. We register one
implementation, ``"latent_sdpa"``, for both: the mask side is transformers' own ``sdpa_mask`` (so causality and
padding are built exactly as for SDPA), and the attention side wraps ``sdpa_attention_forward``. While none of
our context managers is active on a model it *is* SDPA (identical logits). The context managers switch the
**language model's** config to ``latent_sdpa`` on entry and back on exit; the vision tower keeps its own
implementation. No transformers class is forked or patched.

- :func:`attention_bias` adds a bias to the attention logits of selected (query, key) pairs, on top of the causal
  and padding masks: LaViT's curriculum sensory gating (Eq. 4), ``B = ln(gamma(t))`` from response-token queries
  to image-patch keys, ``gamma = 0`` a hard mask (``-inf``).
- :func:`record_attention` returns the attention probabilities of selected query rows over selected key columns
  (softmax over *all* keys, then restricted), reduced over heads and layers, computed for those rows only (never
  the ``L x L`` matrix) and differentiable: LaViT's trajectory loss (Eq. 7) and LaRe's saliency map use it.
- :func:`gate_schedule` is LaViT Eq. 5.

Masks are boolean ``[batch, sequence]`` tensors over the language model's positions (the ``input_ids`` positions,
image tokens already expanded by the processor; left padding included). During cached decoding the new query
positions continue the sequence: positions past a mask's end count as not selected, unless
``extend_queries=True`` (then new query positions count as selected, e.g. gating every generated response
token). For ``mllama`` the image is not in the self-attention sequence: pass ``key_mask="image"`` to target the
cross-attention layers, whose keys are the image tiles' patches.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from latent_core.families import ModelParts, model_parts

__all__ = [
    "ATTENTION_IMPLEMENTATION",
    "AttentionRecorder",
    "attention_bias",
    "gate_bias",
    "gate_schedule",
    "record_attention",
]

ATTENTION_IMPLEMENTATION = "latent_sdpa"
IMAGE_KEYS = "image"


# ---------------------------------------------------------------------------------------------------------------
# LaViT Eq. 5
# ---------------------------------------------------------------------------------------------------------------


def gate_schedule(step: int, warmup: int = 400, eps: float = 1e-6, kind: str = "cosine") -> float:
    """The gate strength gamma(t) of LaViT's curriculum sensory gating (Eq. 5).

    ``cosine``: ``eps + (1 - eps) / 2 * (1 - cos(pi * t / T_w))`` for ``t < T_w``, then 1 (the paper's default,
    ``T_w = 400``, ``eps = 1e-6``); ``hard``: 0 (a hard mask) for ``t < T_w``, then 1 (the "no curriculum"
    ablation); ``open``: 1 throughout (the "single stage" ablation).
    """
    if step < 0 or warmup < 0:
        raise ValueError(f"gate_schedule needs step >= 0 and warmup >= 0, got step={step}, warmup={warmup}")
    if kind == "open" or step >= warmup:
        if kind not in ("cosine", "hard", "open"):
            raise ValueError(f"unknown gate schedule {kind!r}; choose cosine, hard or open")
        return 1.0
    if kind == "cosine":
        return eps + (1.0 - eps) / 2.0 * (1.0 - math.cos(math.pi * step / warmup))
    if kind == "hard":
        return 0.0
    raise ValueError(f"unknown gate schedule {kind!r}; choose cosine, hard or open")


def gate_bias(gamma: float) -> float:
    """``ln(gamma)``, the additive logit bias of a gate of strength ``gamma`` (``-inf`` for ``gamma = 0``)."""
    if gamma < 0:
        raise ValueError(f"gate strength must be >= 0, got {gamma}")
    return math.log(gamma) if gamma > 0 else float("-inf")


# ---------------------------------------------------------------------------------------------------------------
# Active state per language model
# ---------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Bias:
    query_mask: torch.Tensor  # [B, S] bool
    key_mask: torch.Tensor | None  # [B, S] bool; None = every key of a cross-attention layer (mllama image)
    bias: torch.Tensor  # [B] float (may hold -inf)
    cross: bool
    extend_queries: bool

    def __post_init__(self) -> None:
        # A zero bias (gamma = 1) changes nothing: skip it, so the open gate costs nothing and is bit-identical.
        self.active = bool((self.bias != 0).any())


@dataclass(eq=False)
class AttentionRecorder:
    """Collects attention rows during the forward passes inside :func:`record_attention`.

    After the forward, :attr:`weights` holds, per sample ``b``, a tensor ``[n_queries_b, n_keys_b]``: the
    attention probabilities of sample ``b``'s selected queries (in position order) over its selected keys,
    reduced over heads (mean; ``heads="none"`` keeps them: ``[n_queries_b, n_heads, n_keys_b]``) and layers
    (``reduce``; ``"none"`` stacks them first: ``[n_layers, n_queries_b, n_keys_b]``). Rows from several
    forward calls (e.g. cached decoding steps) are concatenated in position order.
    """

    query_mask: torch.Tensor
    key_mask: torch.Tensor | None
    layers: tuple[int, ...]
    reduce: str
    cross: bool
    extend_queries: bool
    heads: str = "mean"
    # layer -> list of (query positions [n], probabilities [B, n, kv_len]) in call order
    _rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def _add(self, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> None:
        self._rows.setdefault(layer, []).append((positions, probs))

    def clear(self) -> None:
        """Forget what was recorded (e.g. between training steps that reuse one recorder)."""
        self._rows.clear()

    def take(self) -> list[torch.Tensor]:
        """:attr:`weights` of the rows recorded since the last ``take`` / :meth:`clear`, then forget them: a loop
        that reads each step's attention (LaRe's refocusing) gets the new rows only, never re-assembling the
        earlier ones."""
        weights = self.weights
        self.clear()
        return weights

    @property
    def weights(self) -> list[torch.Tensor]:
        if not self._rows:
            raise RuntimeError(
                "record_attention recorded nothing: run a forward of the model inside the `with` block "
                f"(recorded layers: {list(self.layers)})"
            )
        per_layer = []
        for layer in self.layers:
            chunks = self._rows.get(layer)
            if not chunks:
                raise RuntimeError(f"layer {layer} recorded no attention rows (is it a layer of the chosen kind?)")
            kv_len = max(p.shape[-1] for _, p in chunks)
            positions = torch.cat([pos for pos, _ in chunks])
            probs = torch.cat([nn.functional.pad(p, (0, kv_len - p.shape[-1])) for _, p in chunks], dim=1)
            order = torch.argsort(positions, stable=True)
            per_layer.append((positions[order], probs[:, order]))  # [B, n_rows, (H,) kv_len]
        stacked = torch.stack([p for _, p in per_layer])  # [n_layers, B, n_rows, kv_len]
        positions = per_layer[0][0]
        if self.reduce == "mean":
            reduced = stacked.mean(0)
        elif self.reduce == "sum":
            reduced = stacked.sum(0)
        else:
            reduced = stacked.transpose(0, 1)  # [B, n_layers, n_rows, kv_len]
        out = []
        row_dim = -3 if self.heads == "none" else -2
        for b in range(reduced.shape[0]):
            q_sel = _mask_at(self.query_mask[b], positions, self.extend_queries)
            rows = reduced[b].index_select(row_dim % reduced[b].ndim, q_sel.nonzero().flatten())
            kv_len = rows.shape[-1]
            if self.key_mask is None:
                k_sel = torch.ones(kv_len, dtype=torch.bool, device=rows.device)
            else:
                k_sel = _mask_at(self.key_mask[b], torch.arange(kv_len, device=rows.device), False)
            out.append(rows[..., k_sel])
        return out


@dataclass
class _State:
    parts: ModelParts
    cross_ids: frozenset[int]
    previous_impl: str | None
    users: int = 0
    biases: list[_Bias] = field(default_factory=list)
    recorders: list[AttentionRecorder] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    # What every layer of one forward shares (gated rows, their masks, recorded rows): computed by the first layer,
    # so the others make no host sync (nonzero / int) and rebuild no mask; emptied before each forward.
    memo: dict[Any, Any] = field(default_factory=dict)
    # Absolute position of the current forward's first query: the tokens its cache already holds, read once per
    # language-model forward (_offset_hook); None outside such a forward (then kv_len - q_len, a growing cache's).
    offset: int | None = None
    self_layer: int = 0  # a self-attention layer's index, to ask the cache its length


_STATES: dict[int, _State] = {}  # id(language-model config) -> state
_IN_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar("latent_checkpointed_layer", default=False)


def _mask_at(mask: torch.Tensor, positions: torch.Tensor, extend: bool) -> torch.Tensor:
    """``mask[positions]`` for a 1-D (or [B, S]) mask, with positions past its end counting as ``extend``."""
    length = mask.shape[-1]
    inside = positions < length
    clipped = positions.clamp(max=max(length - 1, 0))
    picked = mask[..., clipped] if length else torch.zeros_like(mask[..., :0])
    return torch.where(inside, picked, torch.tensor(extend, device=mask.device))


# ---------------------------------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------------------------------


def _base_rows(
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    q_pos: torch.Tensor,
    batch: int,
    kv_len: int,
    causal: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive mask ([B, 1, n, kv_len], 0 or -inf) of query rows ``rows`` as SDPA would apply it."""
    device = q_pos.device
    neg = torch.finfo(dtype).min
    if attention_mask is not None:
        mask = attention_mask[:, :, rows, :kv_len]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, neg)
        return mask.to(dtype).expand(batch, 1, len(rows), kv_len)
    if not causal:
        return torch.zeros(batch, 1, len(rows), kv_len, dtype=dtype, device=device)
    allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos[rows][:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, neg).expand(batch, 1, -1, -1)


def _bias_rows(biases: list[_Bias], rows_pos: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Sum of the active biases over (query rows at positions ``rows_pos``, all keys): [B, 1, n, kv_len]."""
    total = None
    neg = torch.finfo(dtype).min
    for b in biases:
        q = _mask_at(b.query_mask, rows_pos, b.extend_queries)  # [B, n]
        if b.key_mask is None:
            k = torch.ones(q.shape[0], kv_len, dtype=torch.bool, device=q.device)
        else:
            k = _mask_at(b.key_mask, torch.arange(kv_len, device=q.device), False)  # [B, kv_len]
        pair = q[:, :, None] & k[:, None, :]
        value = b.bias.to(dtype)[:, None, None]
        hard = torch.isinf(value) & (value < 0)
        term = torch.where(pair, torch.where(hard, torch.full_like(value, neg), value), torch.zeros((), dtype=dtype))
        term = term[:, None]
        total = term if total is None else torch.maximum(total + term, torch.tensor(neg, dtype=dtype))
    return total


def _masked_attention(module, query, key, value, mask, dropout, scaling):
    """SDPA for a subset of query rows with an explicit additive mask; returns [B, n, H, D]. Grouped KV heads go
    to the kernel as they are (``enable_gqa``) instead of being repeated."""
    gqa = key.shape[1] != query.shape[1]
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask.to(query.dtype), dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )
    return out.transpose(1, 2)


def latent_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA plus the active biases and recorders of :func:`attention_bias` / :func:`record_attention`.

    Registered in ``AttentionInterface`` as ``"latent_sdpa"``. Query rows that no bias touches go through
    transformers' ``sdpa_attention_forward`` unchanged (causal fast path included); only gated rows take the
    explicit-mask path, so a gate on a quarter of the queries costs about a quarter of a masked attention.
    """
    state = _STATES.get(id(getattr(module, "config", None)))
    sdpa_kwargs = dict(dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    if state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **sdpa_kwargs)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    cross = id(module) in state.cross_ids
    offset = state.offset if state.offset is not None else kv_len - q_len
    memo = state.memo if state.offset is not None else {}  # shared by a forward's layers only inside a forward
    layer = getattr(module, "layer_idx", None)
    biases = [b for b in state.biases if b.cross == cross and b.active]
    recorders = [r for r in state.recorders if r.cross == cross and layer in r.layers]
    if not biases and not recorders:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **sdpa_kwargs)

    q_pos = offset + torch.arange(q_len, device=query.device)
    causal = not cross and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    if cross:
        # An mllama cross-attention layer has only image keys: a logit bias on all of them cancels in the softmax.
        # The gate scales those pairs' probabilities by exp(bias) = gamma instead (gamma = 0: the row gets nothing).
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **sdpa_kwargs)
        factor = _cross_factor(biases, q_pos)  # [B, q_len] or None
        if factor is not None:
            output = output * factor[:, :, None, None].to(output.dtype)
    else:
        factor = None
        output = _gated_self_attention(
            module, query, key, value, attention_mask, biases, q_pos, causal, scale, sdpa_kwargs, offset, memo
        )
    if recorders:
        _record(module, recorders, biases, factor, query, key, attention_mask, q_pos, causal, scale, layer, memo)
    return output, None


def _cross_factor(biases: list[_Bias], q_pos: torch.Tensor) -> torch.Tensor | None:
    factor = None
    for b in biases:
        q = _mask_at(b.query_mask, q_pos, b.extend_queries)  # [B, q_len]
        term = torch.where(q, b.bias.exp()[:, None], torch.ones((), device=q.device))
        factor = term if factor is None else factor * term
    return factor


def _gated_self_attention(
    module, query, key, value, attention_mask, biases, q_pos, causal, scale, sdpa_kwargs, offset, memo
):
    """SDPA where the rows that no bias touches take transformers' path unchanged (the causal kernel on a prefix
    when the gated rows are a suffix) and only the gated rows take the explicit-mask path."""
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    plan = _plan(biases, attention_mask, q_pos, batch, kv_len, causal, memo)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **sdpa_kwargs)[0]
    gated_rows, first, suffix, mask = plan
    output = None
    if suffix and first > 0:
        prefix_kv = offset + first
        prefix_mask = None if attention_mask is None else attention_mask[:, :, :first, :prefix_kv]
        prefix = (query[:, :, :first], key[:, :, :prefix_kv], value[:, :, :prefix_kv])
        output = sdpa_attention_forward(module, *prefix, prefix_mask, **sdpa_kwargs)[0]
    elif not suffix:
        output = sdpa_attention_forward(module, query, key, value, attention_mask, **sdpa_kwargs)[0]
    dropout = sdpa_kwargs.get("dropout", 0.0) if module.training else 0.0
    gated_out = _masked_attention(module, query[:, :, gated_rows], key, value, mask, dropout, scale)
    if output is None:
        return gated_out
    if suffix:
        return torch.cat([output, gated_out.to(output.dtype)], dim=1)
    return output.index_copy(1, gated_rows, gated_out.to(output.dtype))


def _plan(biases, attention_mask, q_pos, batch, kv_len, causal, memo):
    """The gated rows of this forward's queries, whether they are a suffix, and their additive mask (base + biases,
    fp32): ``None`` when no row is gated. Computed once per forward and shape (``memo``), then reused by every layer."""
    key = ("plan", id(attention_mask), kv_len, len(q_pos), causal)
    if key in memo:
        return memo[key]
    gated = torch.zeros(len(q_pos), dtype=torch.bool, device=q_pos.device)
    for b in biases:
        gated |= _mask_at(b.query_mask, q_pos, b.extend_queries).any(0)
    gated_rows = gated.nonzero().flatten()
    plan = None
    if len(gated_rows):
        first = int(gated_rows[0])
        neg = torch.finfo(torch.float32).min
        mask = _base_rows(attention_mask, gated_rows, q_pos, batch, kv_len, causal, torch.float32)
        mask = (mask + _bias_rows(biases, q_pos[gated_rows], kv_len, torch.float32)).clamp(min=neg)
        plan = (gated_rows, first, len(gated_rows) == len(q_pos) - first, mask)
    memo[key] = plan
    return plan


def _record(module, recorders, biases, factor, query, key, attention_mask, q_pos, causal, scale, layer, memo) -> None:
    if _IN_CHECKPOINT.get() and not torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        raise RuntimeError(
            "record_attention under reentrant gradient checkpointing would record rows without gradients; use "
            "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
        )
    batch, heads, kv_len = query.shape[0], query.shape[1], key.shape[2]
    kv_heads = key.shape[1]
    for recorder in recorders:
        memo_key = ("rows", id(recorder), len(q_pos))
        if memo_key not in memo:  # once per forward: the other layers make no host sync
            memo[memo_key] = _mask_at(recorder.query_mask, q_pos, recorder.extend_queries).any(0).nonzero().flatten()
        rows = memo[memo_key]
        if len(rows) == 0:
            continue
        # A grouped matmul over the KV heads in the model's dtype: the query heads that share a KV head are stacked,
        # so nothing of the keys' size is copied (no repeat_kv, no fp32 copy) and backward keeps only the layer's own
        # key tensor and the selected query rows; the logits go to fp32 for the softmax.
        n = len(rows)
        q = query[:, :, rows].reshape(batch, kv_heads, (heads // kv_heads) * n, query.shape[-1])
        logits = torch.matmul(q, key.transpose(-1, -2)).view(batch, heads, n, kv_len).float() * scale
        mask_key = ("rmask", id(recorder), id(attention_mask), kv_len, causal, bool(biases) and factor is None)
        if mask_key not in memo:
            mask = _base_rows(attention_mask, rows, q_pos, batch, kv_len, causal, torch.float32)
            if biases and factor is None:
                mask = (mask + _bias_rows(biases, q_pos[rows], kv_len, torch.float32)).clamp(
                    min=torch.finfo(torch.float32).min
                )
            memo[mask_key] = mask
        mask = memo[mask_key]
        probs = torch.softmax(logits + mask, dim=-1)  # [B, H, n, kv_len]
        if factor is not None:
            probs = probs * factor[:, None, rows, None]
        probs = probs.mean(1) if recorder.heads == "mean" else probs.transpose(1, 2)  # [B, n, (H,) kv_len]
        # Under non-reentrant gradient checkpointing the layer is recomputed in backward: the same ops must run
        # (same saved tensors), but the rows were already recorded in the forward.
        if torch._C._current_graph_task_id() == -1:
            recorder._add(layer, q_pos[rows], probs)


AttentionInterface.register(ATTENTION_IMPLEMENTATION, latent_sdpa_attention)
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)


# ---------------------------------------------------------------------------------------------------------------
# Context managers
# ---------------------------------------------------------------------------------------------------------------


def _snapshot(state: _State) -> _State:
    """The state as it is now (biases and recorders active at this layer call), for a checkpoint recompute."""
    return _State(
        parts=state.parts,
        cross_ids=state.cross_ids,
        previous_impl=state.previous_impl,
        biases=list(state.biases),
        recorders=list(state.recorders),
        offset=state.offset,
        self_layer=state.self_layer,
    )


def _run_with_state(snapshot: _State, function, *args, **kwargs):
    """Run ``function`` (a checkpointed layer) with ``snapshot`` installed: activation checkpointing re-runs a
    layer in backward, after our context may have exited; the recompute must see the same biases or its gradients
    would be wrong. Marks the call as checkpointed (a recorder refuses a forward without grad there: reentrant)."""
    token = _IN_CHECKPOINT.set(True)
    try:
        return _run_installed(snapshot, function, *args, **kwargs)
    finally:
        _IN_CHECKPOINT.reset(token)


def _run_installed(snapshot: _State, function, *args, **kwargs):
    config = snapshot.parts.language_model.config
    key = id(config)
    current = _STATES.get(key)
    if current is not None and current.biases == snapshot.biases and current.recorders == snapshot.recorders:
        if torch._C._current_graph_task_id() == -1:  # the forward itself
            return function(*args, **kwargs)
        # The recompute in backward, our context still active: the forward's query offset (a cross-attention
        # layer's key length is the image's, not the sequence's) and a memo of its own.
        saved = current.offset, current.memo
        current.offset, current.memo = snapshot.offset, {}
        try:
            return function(*args, **kwargs)
        finally:
            current.offset, current.memo = saved
    previous_impl = config._attn_implementation_internal
    _STATES[key] = snapshot
    config._attn_implementation_internal = ATTENTION_IMPLEMENTATION
    try:
        return function(*args, **kwargs)
    finally:
        config._attn_implementation_internal = previous_impl
        if current is None:
            del _STATES[key]
        else:
            _STATES[key] = current


def _checkpoint_with_state(original, state: _State):
    def checkpoint(function, *args, **kwargs):
        return original(functools.partial(_run_with_state, _snapshot(state), function), *args, **kwargs)

    checkpoint.__wrapped__ = original
    return checkpoint


_SLIDING = ("DynamicSlidingWindowLayer", "StaticSlidingWindowLayer")


def _offset_hook(state: _State):
    """Before each language-model forward: the first query's absolute position = the tokens its cache holds. Right
    for a growing ``DynamicCache`` and a preallocated ``StaticCache`` alike (whose key length is its capacity, not
    the positions filled). A sliding-window cache drops old keys, so key columns are no longer positions: refused."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.memo.clear()
        cache = kwargs.get("past_key_values")
        if cache is None or not hasattr(cache, "get_seq_length"):
            state.offset = 0
            return
        layers = getattr(cache, "layers", ())
        sliding = [type(layer).__name__ for layer in layers if type(layer).__name__ in _SLIDING]
        if sliding and (state.biases or state.recorders):
            raise ValueError(
                f"attention_bias / record_attention need a full-attention KV cache (DynamicCache or StaticCache); "
                f"this one has sliding-window layers ({sliding[0]}), which drop old keys, so a key mask over "
                "positions no longer matches the cached keys"
            )
        state.offset = int(cache.get_seq_length(state.self_layer))

    return hook


def _clear_offset(state: _State):
    def hook(module: nn.Module, args: tuple, kwargs: dict | None = None, output: Any = None) -> None:
        state.offset = None
        state.memo.clear()

    return hook


@contextmanager
def _activated(model: nn.Module) -> Iterator[_State]:
    """Switch the language model to ``latent_sdpa`` for the duration (re-entrant), and back afterwards."""
    parts = model_parts(model)
    config = parts.language_model.config
    state = _STATES.get(id(config))
    if state is None:
        previous = config._attn_implementation
        if previous not in (None, "sdpa", "eager", ATTENTION_IMPLEMENTATION):
            raise ValueError(
                f"the language model uses attn_implementation={previous!r}; attention_bias / record_attention "
                "wrap SDPA: load the model with attn_implementation='sdpa' (or 'eager')"
            )
        cross_ids = frozenset(id(parts.decoder_layers[i].cross_attn) for i in parts.cross_attention_layers)
        self_layer = next(i for i in range(len(parts.decoder_layers)) if i not in parts.cross_attention_layers)
        state = _STATES[id(config)] = _State(
            parts=parts, cross_ids=cross_ids, previous_impl=previous, self_layer=self_layer
        )
        config._attn_implementation_internal = ATTENTION_IMPLEMENTATION
        state.hooks = [
            parts.language_model.register_forward_pre_hook(_offset_hook(state), with_kwargs=True),
            parts.language_model.register_forward_hook(_clear_offset(state), always_call=True),
        ]
        # Layers under activation checkpointing: wrap their checkpoint function (an instance attribute that
        # transformers sets) so a recompute in backward sees the biases active at forward time; undone on exit.
        for layer in parts.decoder_layers:
            original = layer.__dict__.get("_gradient_checkpointing_func")
            if original is not None:
                layer._gradient_checkpointing_func = _checkpoint_with_state(original, state)
    state.users += 1
    try:
        yield state
    finally:
        state.users -= 1
        if state.users == 0:
            config._attn_implementation_internal = state.previous_impl
            del _STATES[id(config)]
            for hook in state.hooks:
                hook.remove()
            for layer in parts.decoder_layers:
                wrapped = layer.__dict__.get("_gradient_checkpointing_func")
                if wrapped is not None and hasattr(wrapped, "__wrapped__"):
                    layer._gradient_checkpointing_func = wrapped.__wrapped__


def _check_mask(name: str, mask: Any, batch: int | None = None) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        dtype = mask.dtype if isinstance(mask, torch.Tensor) else None
        raise ValueError(
            f"{name} must be a boolean tensor [batch, sequence] over the language model's positions; "
            f"got {shape} of dtype {dtype}"
        )
    if batch is not None and mask.shape[0] != batch:
        raise ValueError(f"{name} has batch size {mask.shape[0]}, but query_mask has {batch}")
    return mask


def _resolve_keys(parts: ModelParts, key_mask: Any, batch: int) -> tuple[torch.Tensor | None, bool]:
    """(key mask or None for all cross-attention keys, targets cross-attention layers)."""
    if isinstance(key_mask, str):
        if key_mask != IMAGE_KEYS:
            raise ValueError(f"key_mask must be a boolean [batch, sequence] tensor or {IMAGE_KEYS!r}, got {key_mask!r}")
        if parts.family.images_via != "cross_attention":
            raise ValueError(
                f"key_mask='image' targets cross-attention layers (mllama); family {parts.family.name!r} has the "
                "image in the sequence: pass latent_core.image_token_mask(model, input_ids) instead"
            )
        return None, True
    return _check_mask("key_mask", key_mask, batch), False


def _bias_tensor(bias: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    value = torch.as_tensor(bias, dtype=torch.float32, device=device)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"bias must be a float or a tensor [batch]={batch}, got shape {tuple(value.shape)}")
    if torch.isnan(value).any() or (torch.isinf(value) & (value > 0)).any():
        raise ValueError("bias must not be NaN or +inf (use -inf for a hard mask)")
    return value


@contextmanager
def attention_bias(
    model: nn.Module,
    query_mask: torch.Tensor,
    key_mask: torch.Tensor | str,
    bias: float | torch.Tensor,
    extend_queries: bool = False,
) -> Iterator[None]:
    """Add ``bias`` to the attention logits of the (query, key) pairs selected by the masks.

    Applies in every language self-attention layer (for ``mllama`` with ``key_mask="image"``: in every
    cross-attention layer, over all image keys), on top of the causal and padding masks. A **choice** for mllama
    (METHODS.md): its cross-attention keys are all image keys, so a logit bias on all of them would cancel in the
    softmax; the gate scales those rows' cross-attention output by ``gamma = exp(bias)`` instead. Query positions
    are absolute: the offset of each forward is read from its KV cache (``DynamicCache`` or ``StaticCache``; a
    sliding-window cache is refused). ``bias`` is a float
    (LaViT Eq. 4: ``ln(gamma(t))``, see :func:`gate_bias`), a per-sample tensor ``[batch]``, or ``-inf`` for a
    hard mask (the pair gets exactly zero probability). Unselected pairs are untouched. Contexts nest: biases add.

    Args:
        model: a model of a supported family (a PEFT-wrapped one too).
        query_mask: bool ``[batch, sequence]``: the queries to gate (e.g. the response tokens).
        key_mask: bool ``[batch, sequence]``: the keys to gate (e.g. ``image_token_mask``), or ``"image"``
            (mllama: the cross-attended image).
        bias: the additive logit bias.
        extend_queries: query positions past ``query_mask``'s end (cached decoding) count as selected.
    """
    query_mask = _check_mask("query_mask", query_mask)
    with _activated(model) as state:
        keys, cross = _resolve_keys(state.parts, key_mask, query_mask.shape[0])
        entry = _Bias(
            query_mask, keys, _bias_tensor(bias, query_mask.shape[0], query_mask.device), cross, extend_queries
        )
        state.biases.append(entry)
        try:
            yield
        finally:
            state.biases.remove(entry)


@contextmanager
def record_attention(
    model: nn.Module,
    query_mask: torch.Tensor,
    key_mask: torch.Tensor | str,
    layers: Sequence[int] | None = None,
    reduce: str = "mean",
    extend_queries: bool = False,
    heads: str = "mean",
) -> Iterator[AttentionRecorder]:
    """Record the attention probabilities of the selected query rows over the selected key columns.

    The softmax runs over all keys (with the causal/padding masks and any active :func:`attention_bias`), then the
    selected columns are kept; heads are averaged, layers reduced by ``reduce`` (``mean``, ``sum`` or ``none``).
    Only the selected rows are computed (memory ``rows x L`` per layer, never ``L x L``), from the layer's own
    queries and keys, so the result is differentiable when grad is on (LaViT's L_traj, Eq. 7). Works with the
    KV cache (rows of successive calls are concatenated), left padding, M-RoPE, and non-reentrant gradient
    checkpointing (recomputation in backward records nothing twice).

    Args:
        layers: indices into the decoder layers (default: every self-attention layer, or with
            ``key_mask="image"`` every mllama cross-attention layer).
        heads: ``"mean"`` over heads (default) or ``"none"`` to keep them.

    Yields:
        an :class:`AttentionRecorder`; after the forward, ``recorder.weights[b]`` is ``[n_queries_b, n_keys_b]``.
    """
    query_mask = _check_mask("query_mask", query_mask)
    if reduce not in ("mean", "sum", "none"):
        raise ValueError(f"reduce must be 'mean', 'sum' or 'none', got {reduce!r}")
    if heads not in ("mean", "none"):
        raise ValueError(f"heads must be 'mean' or 'none', got {heads!r}")
    with _activated(model) as state:
        keys, cross = _resolve_keys(state.parts, key_mask, query_mask.shape[0])
        n_layers = len(state.parts.decoder_layers)
        kind = set(state.parts.cross_attention_layers)
        eligible = [i for i in range(n_layers) if (i in kind) == cross]
        chosen = tuple(eligible if layers is None else (i % n_layers if i < 0 else i for i in layers))
        bad = [i for i in chosen if i not in eligible]
        if bad or not chosen:
            what = "cross-attention" if cross else "self-attention"
            raise ValueError(
                f"layers {bad or list(chosen)} are not {what} layers of this model; choose from {eligible}"
            )
        recorder = AttentionRecorder(query_mask, keys, chosen, reduce, cross, extend_queries, heads)
        state.recorders.append(recorder)
        try:
            yield recorder
        finally:
            state.recorders.remove(recorder)
