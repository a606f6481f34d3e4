"""Hidden-state capture: record the hidden states of selected positions only, in a forward or during ``generate``.

What it serves:

- **Heima interpreters** (METHODS.md section 1): the hidden state H_k of each thinking token, captured from the
  frozen Heima model teacher-forced on the fully replaced answer, or while it generates with the KV cache on
  ("store only those rows"). The authors' code takes the state that *predicts* the thinking token (position t-1,
  :func:`select_predictors`, the default there); the paper's wording is the state *at* the token (position t,
  :func:`select_tokens`). Both are here.
- **LaViT / LaRe latent tokens**: the hidden state of the latent tokens (``h_z`` of the last ``<v-trace_K>`` for
  L_concept, the continuous latent inputs) with ``keep_grad=True`` so that a training loss can use them.

"Hidden state" is the output of the language model's final norm (what feeds ``lm_head``; METHODS.md section 0),
``layer=-1``; ``layer=i`` is the output of decoder layer ``i`` instead. Forward hooks on that module record the
rows; a forward pre-hook on the model itself reads each call's ``input_ids``, ``attention_mask`` and KV-cache length.
All hooks are removed when the context exits, also on an exception.

    >>> with capture_hidden_states(model, select_predictors(thinking_ids)) as rec:
    ...     out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    ...     rec.finalize(out)              # settles the state that predicted the last generated token
    >>> rec.states[0], rec.positions[0], rec.token_ids[0]    # sample 0: [n, hidden], columns of `out`, ids

Positions are absolute columns of the model's token matrix: for ``generate`` the columns of the returned sequences
(prompt included, left padding included), for a forward the columns of ``input_ids``. Padding (``attention_mask``
0) is never recorded. For the image-token families (llava, llava_next, qwen2_5_vl) the processor has already
expanded the image tokens, so the language model's sequence is ``input_ids`` itself; mllama's image features enter
through cross-attention and its sequence is ``input_ids`` too. A mismatch raises.

Samples: every call that starts a sequence (empty KV cache) starts a *run* whose batch rows become new samples,
numbered on from the previous run; calls that continue the cache (the decoding steps of ``generate``) append to
the samples of the current run. Greedy decoding and sampling are supported; beam search reorders the cache rows
between steps and is not. A call given ``inputs_embeds`` without ``input_ids`` (a continuous latent step) has no
token ids: token and predictor selections skip its positions, a mask (plain forward) records them with id ``-1``.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from latent_core.families import _unwrap_peft, model_parts

__all__ = [
    "HiddenStateRecorder",
    "ImageFeatures",
    "Selection",
    "capture_hidden_states",
    "capture_image_features",
    "select_mask",
    "select_predictors",
    "select_tokens",
]


@dataclass(frozen=True)
class Selection:
    """Which positions a capture records; build it with :func:`select_tokens`, :func:`select_predictors` or
    :func:`select_mask`."""

    kind: Literal["tokens", "predictors", "mask"]
    token_ids: tuple[int, ...] = ()
    mask: torch.Tensor | None = field(default=None, compare=False)


def _ids(ids: int | Iterable[int], what: str) -> tuple[int, ...]:
    """Token ids as a tuple of ints (ints, numpy or 0-d torch integers; duplicates dropped)."""
    values = [ids] if not isinstance(ids, Iterable) or isinstance(ids, torch.Tensor) and ids.dim() == 0 else list(ids)
    try:
        if not values or any(isinstance(i, bool | str) for i in values):
            raise TypeError
        values = [operator.index(i) for i in values]
    except TypeError:
        raise TypeError(f"{what} needs a token id or a non-empty list of token ids (ints), got {ids!r}") from None
    if any(i < 0 for i in values):
        raise ValueError(f"{what}: token ids must be >= 0, got {values}")
    return tuple(dict.fromkeys(values))


def select_tokens(ids: int | Iterable[int]) -> Selection:
    """Positions whose input token is one of ``ids`` (the state *at* the token, e.g. a thinking token).

    During ``generate`` a generated token is fed back at the next step, so its state is recorded then; the last
    generated token is never fed back and has no state.
    """
    return Selection("tokens", _ids(ids, "select_tokens"))


def select_predictors(ids: int | Iterable[int]) -> Selection:
    """Positions ``t - 1`` whose *next* token (at ``t``) is one of ``ids``: the state that predicts the token.

    Heima's interpreter default (the authors' code). ``token_ids`` of the records are the predicted tokens. The
    last position of a call waits for the next call's first token; after ``generate`` call
    :meth:`HiddenStateRecorder.finalize` with the output to settle the state that predicted the last token.
    """
    return Selection("predictors", _ids(ids, "select_predictors"))


def select_mask(mask: torch.Tensor) -> Selection:
    """A boolean ``[batch, seq]`` mask over the columns of ``input_ids`` of a plain forward (one call per sequence).

    Not for ``generate``: a call that continues a KV cache raises (select by tokens or predictors there).
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"select_mask needs a boolean tensor of shape [batch, seq], got {got}")
    return Selection("mask", mask=mask)


@dataclass
class _Call:
    """What the model's pre-hook saw of one forward call."""

    batch: int
    length: int
    offset: int
    input_ids: torch.Tensor | None
    valid: torch.Tensor | None
    recorded: bool = False


class HiddenStateRecorder:
    """The rows a :func:`capture_hidden_states` context recorded, per sample.

    Attributes:
        selection: the :class:`Selection`.
        layer: ``-1`` (final norm) or the decoder layer index.
        states: per sample, a tensor ``[n_selected, hidden]`` (rows in position order).
        positions: per sample, the absolute positions (columns) of those rows.
        token_ids: per sample, the selected token ids: the token at the position for :func:`select_tokens` and
            :func:`select_mask` (``-1`` if the call had no ``input_ids``), the predicted token for
            :func:`select_predictors`.
    """

    def __init__(self, selection: Selection, layer: int, keep_grad: bool, device: torch.device | str | None) -> None:
        self.selection = selection
        self.layer = layer
        self.keep_grad = keep_grad
        self.device = torch.device(device) if device is not None else None
        self._rows: list[list[torch.Tensor]] = []
        self.positions: list[list[int]] = []
        self.token_ids: list[list[int]] = []
        self._like: tuple[int, torch.dtype | None, torch.device | None] = (0, None, self.device)  # for empty states
        self._run_start = 0  # first sample of the current run
        self._run_batch = 0
        self._run_length = 0  # positions seen in the current run
        self._pending: dict[int, tuple[int, torch.Tensor]] = {}  # predictors: sample -> (position, state)
        self._call: _Call | None = None
        self._wanted = torch.tensor(selection.token_ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def states(self) -> list[torch.Tensor]:
        """Per sample, the recorded rows ``[n_selected, hidden]`` (``[0, hidden]`` when none was selected)."""
        hidden, dtype, device = self._like
        return [torch.cat(rows) if rows else torch.empty(0, hidden, dtype=dtype, device=device) for rows in self._rows]

    def finalize(self, sequences: Any) -> HiddenStateRecorder:
        """Settle the pending predictor states of the current run with the final token ids.

        ``sequences`` is the output of ``generate`` (a tensor ``[batch, length]`` or an output object with
        ``.sequences``). The state at the last fed position predicted the last generated token, which is never fed
        back; it is recorded here if that token is selected. A no-op for the other selections.
        """
        sequences = getattr(sequences, "sequences", sequences)
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
            raise ValueError("finalize needs the generated sequences, a [batch, length] tensor of token ids")
        if self._pending and (
            sequences.shape[0] != self._run_batch or sequences.shape[1] not in (self._run_length, self._run_length + 1)
        ):
            raise ValueError(
                f"finalize got sequences of shape {tuple(sequences.shape)}, but the current run has "
                f"{self._run_batch} samples and {self._run_length} fed positions: pass the output of the generate call "
                "that ran inside the capture"
            )
        for b, (position, state) in sorted(self._pending.items()):
            if position + 1 < sequences.shape[1]:
                token = int(sequences[b, position + 1])
                if token in self.selection.token_ids:
                    self._append(self._run_start + b, [position], [token], state)
        self._pending.clear()
        return self

    # -- recording ---------------------------------------------------------------------------------------------

    def _append(self, sample: int, positions: list[int], tokens: list[int], rows: torch.Tensor) -> None:
        """Store ``rows`` ``[k, hidden]`` (a tensor of its own, not a view of the model's output) of one sample."""
        self._rows[sample].append(rows)
        self.positions[sample].extend(positions)
        self.token_ids[sample].extend(tokens)

    def _keep(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows if self.keep_grad else rows.detach()
        return rows.to(self.device) if self.device is not None else rows

    def _start_call(self, call: _Call) -> None:
        if self.selection.kind == "mask":
            if call.offset > 0:
                raise ValueError(
                    f"select_mask works on a plain forward over whole sequences; this call continues a KV cache at "
                    f"position {call.offset} (as generate does). Select by tokens or predictors during generate."
                )
            mask = self.selection.mask
            assert mask is not None
            if tuple(mask.shape) != (call.batch, call.length):
                raise ValueError(
                    f"select_mask: the mask has shape {tuple(mask.shape)} but the forward's input is "
                    f"[batch, seq] = [{call.batch}, {call.length}]"
                )
        if call.offset == 0:  # a new sequence: a new run of samples
            self._pending.clear()
            self._run_start, self._run_batch, self._run_length = len(self._rows), call.batch, 0
            for _ in range(call.batch):
                self._rows.append([])
                self.positions.append([])
                self.token_ids.append([])
        elif call.batch != self._run_batch or call.offset != self._run_length:
            raise RuntimeError(
                f"this call continues a KV cache of {call.offset} positions with batch {call.batch}, but the capture "
                f"recorded {self._run_length} positions with batch {self._run_batch}: open the capture before the "
                "prefill and run greedy or sampled generate (beam search reorders the cache and is not supported)"
            )
        self._run_length = call.offset + call.length
        self._call = call

    def _record(self, hidden: torch.Tensor) -> None:
        call = self._call
        if call is None or call.recorded:  # a module called outside a model call, or a second time: ignore
            return
        call.recorded = True
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (call.batch, call.length):
            raise RuntimeError(
                f"the captured module's output has shape {tuple(hidden.shape)} but the model's input is "
                f"[batch, seq] = [{call.batch}, {call.length}]: the language-model sequence is not input_ids here"
            )
        self._like = (hidden.shape[-1], hidden.dtype, self.device or hidden.device)
        device = hidden.device
        ids = call.input_ids.to(device) if call.input_ids is not None else None
        valid = call.valid.to(device) if call.valid is not None else torch.ones_like(hidden[..., 0], dtype=torch.bool)
        wanted = self._wanted.to(device)
        kind = self.selection.kind

        if kind == "tokens":
            selected = torch.isin(ids, wanted) & valid if ids is not None else torch.zeros_like(valid)
            tokens = ids
        elif kind == "mask":
            assert self.selection.mask is not None
            selected = self.selection.mask.to(device) & valid
            tokens = ids
        else:  # predictors: position t is selected when the token at t + 1 is wanted
            if self._pending:
                self._settle_pending(ids, valid)
            selected = torch.zeros_like(valid)
            tokens = None
            if ids is not None:
                selected[:, :-1] = torch.isin(ids[:, 1:], wanted) & valid[:, :-1] & valid[:, 1:]
                tokens = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-1)
            for b in valid[:, -1].nonzero().flatten().tolist():
                self._pending[b] = (call.offset + call.length - 1, self._keep(hidden[b, -1:].clone()))

        where = selected.nonzero()
        if len(where) == 0:
            return
        token_list = tokens[selected].tolist() if tokens is not None else [-1] * len(where)
        samples, columns = where[:, 0].tolist(), where[:, 1].tolist()
        for b in sorted(set(samples)):
            picked = [k for k, s in enumerate(samples) if s == b]
            rows = self._keep(hidden[b, where[picked, 1]])  # advanced indexing: a copy of the selected rows only
            positions = [call.offset + columns[k] for k in picked]
            self._append(self._run_start + b, positions, [int(token_list[k]) for k in picked], rows)

    def _settle_pending(self, ids: torch.Tensor | None, valid: torch.Tensor) -> None:
        """The pending states predicted this call's first tokens: keep those whose token is wanted."""
        first = ids[:, 0].tolist() if ids is not None else None
        first_valid = valid[:, 0].tolist()
        for b, (position, state) in sorted(self._pending.items()):
            if first is not None and first_valid[b] and first[b] in self.selection.token_ids:
                self._append(self._run_start + b, [position], [first[b]], state)
        self._pending.clear()


def _as_selection(select: Any) -> Selection:
    if isinstance(select, Selection):
        return select
    if isinstance(select, torch.Tensor):
        raise TypeError("pass a mask as select=select_mask(mask), token ids as a list or select_tokens(ids)")
    return select_tokens(select)


def _cache_length(past_key_values: Any, layer_idx: int) -> int:
    if past_key_values is None or not hasattr(past_key_values, "get_seq_length"):
        return 0
    return int(past_key_values.get_seq_length(layer_idx))


@contextlib.contextmanager
def capture_hidden_states(
    model: nn.Module,
    select: Selection | int | Iterable[int],
    layer: int = -1,
    *,
    keep_grad: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[HiddenStateRecorder]:
    """Record the hidden states of the selected positions while the body runs forwards or ``generate``.

    Args:
        model: a model of a supported family (PEFT-wrapped too); call the model itself (``model(...)`` or
            ``model.generate(...)``), not its inner modules.
        select: a :class:`Selection` (:func:`select_tokens`, :func:`select_predictors`, :func:`select_mask`), or a
            token id / list of ids (= ``select_tokens``).
        layer: ``-1`` for the final-norm output (what feeds ``lm_head``), ``i`` for the output of decoder layer
            ``i``. Mllama skips its cross-attention layers when the input has no image; capturing one then raises.
        keep_grad: keep the rows in the autograd graph (for a training loss); detached otherwise.
        device: move the stored rows there (e.g. ``"cpu"``); they stay where the model computed them by default.

    Yields:
        the :class:`HiddenStateRecorder`; it keeps its rows after the context exits.

    Raises:
        ValueError: an out-of-range ``layer``, a mask of the wrong shape, a mask used with ``generate``.
    """
    selection = _as_selection(select)
    base = _unwrap_peft(model)
    parts = model_parts(model)
    n_layers = len(parts.decoder_layers)
    if not isinstance(layer, int) or not -1 <= layer < n_layers:
        raise ValueError(f"layer must be -1 (the final norm) or a decoder layer index 0..{n_layers - 1}; got {layer!r}")
    target = parts.final_norm if layer == -1 else parts.decoder_layers[layer]
    cache_layer = next((i for i in range(n_layers) if i not in parts.cross_attention_layers), 0)
    recorder = HiddenStateRecorder(selection, layer, keep_grad, device)

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            input_ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None:
            batch, length = input_ids.shape
        elif embeds is not None:
            batch, length = embeds.shape[:2]
        else:
            raise ValueError("the model was called without input_ids or inputs_embeds; cannot capture positions")
        attention_mask = kwargs.get("attention_mask")
        valid = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[1] >= length:
            valid = attention_mask[:, -length:].bool()
        offset = _cache_length(kwargs.get("past_key_values"), cache_layer)
        recorder._start_call(_Call(batch, length, offset, input_ids, valid))

    def on_output(module: nn.Module, args: tuple, output: Any) -> None:
        recorder._record(output[0] if isinstance(output, tuple) else output)

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        call, recorder._call = recorder._call, None
        if call is not None and not call.recorded:
            raise RuntimeError(
                f"decoder layer {layer} did not run in this forward (mllama skips its cross-attention layers "
                f"{list(parts.cross_attention_layers)} when the input has no image): capture another layer"
            )

    handles = [
        base.register_forward_pre_hook(before, with_kwargs=True),
        target.register_forward_hook(on_output),
        base.register_forward_hook(after),
    ]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
        recorder._call = None


@dataclass
class ImageFeatures:
    """What :func:`capture_image_features` caught: ``features[b]`` ``[n_b, d]`` the projector-output image
    features of sample ``b`` as the language model receives them (``None`` until a forward with an image ran)."""

    features: list[torch.Tensor] | None = None


@contextlib.contextmanager
def capture_image_features(model: nn.Module, input_ids: torch.Tensor | None = None) -> Iterator[ImageFeatures]:
    """Catch the image features after the projector, per sample, in the first forward that carries an image.

    LaRe's refocusing window takes projector-output visual tokens (METHODS.md section 3). These are read where the
    language model receives them, so they are exactly what it attends to, whatever the family's projector:

    - image-token families (llava, llava_next, qwen2_5_vl): the language model's ``inputs_embeds`` at the image
      positions of ``input_ids`` (required), in sequence order (llava_next: with its row-end ``image_newline``);
    - mllama: the ``cross_attention_states`` handed to the language model, ``[n_images * tiles * patches, d]``
      per sample (padded tiles and images included: the ``aspect_ratio_mask`` of the processor says which are
      real).

    Gradients flow through them when the projector trains. Hooks are removed on exit.
    """
    from latent_core.families import image_token_mask

    base = _unwrap_peft(model)
    parts = model_parts(base)
    holder = ImageFeatures()
    if parts.family.images_via != "cross_attention" and input_ids is None:
        raise ValueError(
            f"capture_image_features needs the input_ids for family {parts.family.name!r}: its image features are "
            "the language model's inputs at the image-token positions"
        )
    mask = None if input_ids is None else image_token_mask(base, input_ids)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if holder.features is not None:
            return
        cross = kwargs.get("cross_attention_states")
        if cross is not None:  # mllama: [B * images * tiles, patches, d] -> per sample
            sequence = kwargs.get("input_ids")
            sequence = kwargs.get("inputs_embeds") if sequence is None else sequence
            holder.features = list(cross.reshape(sequence.shape[0], -1, cross.shape[-1]).unbind(0))
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or mask is None or not bool(mask.any()):
            return
        if embeds.shape[:2] != mask.shape:
            raise ValueError(
                f"capture_image_features: the language model received {tuple(embeds.shape[:2])} positions, "
                f"input_ids has {tuple(mask.shape)}; pass the input_ids of this forward"
            )
        holder.features = [embeds[b][mask[b].to(embeds.device)] for b in range(embeds.shape[0])]

    handle = parts.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield holder
    finally:
        handle.remove()
