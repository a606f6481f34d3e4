"""Token surgery: add special tokens to a model and its tokenizer, give them real, trainable rows.

Every method here brings new vocabulary: Heima's thinking tokens (``<THINKING_OF_SUMMARY>``, ...; METHODS.md
section 1: "we add real tokens and train their rows", unlike the authors who reused reserved Llama-3 ids and froze
the table), LaViT's ``<v-trace_1>..<v-trace_K>`` latent tokens, LaRe's latent tokens. :func:`add_special_tokens`
adds them to the tokenizer, makes sure the input embedding *and* the output projection (``lm_head``) have rows for
them, and initialises those rows; :func:`trainable_token_indices` gives the PEFT ``LoraConfig`` value that makes
exactly those rows trainable under LoRA.

Where the rows come from:

- **Spare rows are reused.** Many checkpoints have more embedding rows than tokenizer entries (Qwen2.5: 151,936
  rows for 151,665 tokens; Llama-3.2-Vision: 128,264 rows for 128,257 tokens). New ids that fall inside the
  existing tables take those rows; nothing is resized.
- **Otherwise the tables grow** with ``model.resize_token_embeddings(max_id + 1, mean_resizing=False)`` (we
  initialise the rows ourselves, so transformers' covariance-based ``mean_resizing`` would be wasted work).
- **An lm_head smaller than the embedding (mllama).** Mllama's ``embed_tokens`` has ``vocab_size + 8`` rows but
  ``lm_head`` has ``vocab_size`` outputs, and the model class rebuilds the embedding as ``vocab_size + 8`` when
  loading. A new token must have an ``lm_head`` row to be generated, so ``lm_head`` grows to ``max_id + 1``
  outputs, ``config.text_config.vocab_size`` follows it (the loss uses it), and the embedding grows only as far
  as needed to keep ``rows == vocab_size + 8``. transformers' own ``resize_token_embeddings`` makes both tables
  equal and sets ``vocab_size`` to that, so a resized mllama no longer loads back (size mismatch of
  ``embed_tokens``); we avoid it there. Output rows that appear only because a higher id needed one (for the real
  checkpoint: ``<|image|>`` = 128256, which had no ``lm_head`` row) are set to the mean of the existing rows, the
  vocabulary-expansion choice that keeps their probability at about that of an average token.

Initialisation of the new rows (the same rule for the input embedding and an untied ``lm_head``; a tied head
shares the tensor and is initialised once):

- ``"mean"``: the mean of the rows of the real vocabulary (ids below the tokenizer length before the call; spare
  rows hold untrained values and are left out);
- ``"random"``: zero-mean normal with the standard deviation of those rows, from ``torch.Generator`` seeded with
  ``seed`` (the global generator when ``seed`` is None);
- ``"text"``: the mean of the rows of the tokens of ``init_text`` (the ``lm_head`` rows of those tokens for the
  ``lm_head``), e.g. ``init_text="summary"`` for ``<THINKING_OF_SUMMARY>``.

On the meta device (a model built without weights, e.g. by ``apps/cli plan``) the tables are grown exactly as above
but no row values are computed or written: there are none to read.

Under DeepSpeed ZeRO-3 the row writes happen inside ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``
(rank 0 writes, the context broadcasts and re-partitions on exit) and shapes are read from ``ds_shape``; the resize
itself is transformers' ZeRO-3 aware code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import nn

from latent_core.families import _unwrap_peft
from latent_core.zero3 import gathered, num_rows

__all__ = ["INIT_MODES", "add_special_tokens", "trainable_token_indices"]

INIT_MODES: tuple[str, ...] = ("mean", "random", "text")
"""The row initialisations :func:`add_special_tokens` knows."""


def _tokenizer_of(processor_or_tokenizer: Any) -> Any:
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    if not (hasattr(tokenizer, "add_special_tokens") and hasattr(tokenizer, "convert_tokens_to_ids")):
        raise TypeError(
            f"expected a processor with a .tokenizer or a tokenizer, got {type(processor_or_tokenizer).__name__}"
        )
    return tokenizer


def _embedding_and_head(model: nn.Module) -> tuple[transformers.PreTrainedModel, nn.Module, nn.Module | None]:
    if _unwrap_peft(model) is not model:
        raise TypeError(
            "add special tokens to the transformers model before wrapping it with PEFT (get_peft_model); "
            "the adapter's trainable_token_indices must name rows that already exist"
        )
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embeddings = None
    if not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(model).__name__} has no input embeddings (get_input_embeddings() gave "
            f"{type(embeddings).__name__}); new tokens need an embedding table to get rows in"
        )
    head = model.get_output_embeddings()
    if head is not None and not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__}'s output embeddings {type(head).__name__} have no weight")
    return model, embeddings, head


def _check_tokens(tokens: Any) -> list[str]:
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise TypeError(f"tokens must be a list of strings, got {type(tokens).__name__}: {tokens!r}")
    if len(tokens) == 0:
        raise ValueError("tokens is empty: pass the special tokens to add, e.g. ['<THINKING_OF_SUMMARY>']")
    for token in tokens:
        if not isinstance(token, str) or not token or token.isspace():
            raise TypeError(f"every token must be a non-empty string; got {token!r} in {list(tokens)!r}")
    duplicates = sorted({t for t in tokens if list(tokens).count(t) > 1})
    if duplicates:
        raise ValueError(f"tokens lists {duplicates} more than once; pass each new token once")
    return list(tokens)


def _new_rows(
    weight: torch.Tensor,
    n: int,
    real_rows: int,
    init: str,
    text_ids: list[int] | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``n`` rows for ``weight`` (float32, CPU): the init rule applied to its first ``real_rows`` rows."""
    if init == "text":
        assert text_ids is not None
        return weight.data[text_ids].float().mean(0, keepdim=True).cpu().expand(n, -1).clone()
    real = weight.data[:real_rows].float()
    if init == "mean":
        return real.mean(0, keepdim=True).cpu().expand(n, -1).clone()
    std = float(real.std())
    return torch.randn(n, weight.shape[1], generator=generator) * std


def _write(weight: torch.Tensor, ids: list[int], rows: torch.Tensor) -> None:
    if ids:
        index = torch.tensor(ids, device=weight.device)
        weight.data[index] = rows.to(device=weight.device, dtype=weight.dtype)


def add_special_tokens(
    model: transformers.PreTrainedModel,
    processor_or_tokenizer: Any,
    tokens: list[str],
    init: str = "mean",
    init_text: str | None = None,
    seed: int | None = None,
) -> list[int]:
    """Add ``tokens`` as special tokens to the tokenizer and give them initialised embedding and ``lm_head`` rows.

    Heima's thinking tokens and LaViT's/LaRe's latent tokens are created with this (see the module docstring for
    where the rows come from: spare rows reused, tables grown otherwise, mllama's smaller ``lm_head`` grown).

    Idempotent: tokens the tokenizer already has keep their ids and their rows are not touched, so calling it again
    (for instance on a freshly loaded base model before ``PeftModel.from_pretrained``) returns the same ids and
    changes no weight. Rows are initialised only for tokens this call adds (and for ids that had no row yet).

    Args:
        model: a transformers model, not yet wrapped by PEFT.
        processor_or_tokenizer: a processor (its ``.tokenizer`` is changed in place) or a tokenizer.
        tokens: the new tokens, e.g. ``["<THINKING_OF_SUMMARY>", "<THINKING_OF_CAPTION>"]``.
        init: ``"mean"``, ``"random"`` or ``"text"`` (see the module docstring).
        init_text: the text whose token rows are averaged; required for ``init="text"`` and only allowed there.
        seed: seed of the generator for ``init="random"``.

    Returns:
        The token ids, in the order of ``tokens``.

    Raises:
        TypeError / ValueError: empty or non-string tokens, an unknown ``init``, a missing or empty ``init_text``,
            a model without input embeddings, a PEFT-wrapped model.
    """
    tokens = _check_tokens(tokens)
    if init not in INIT_MODES:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INIT_MODES)}")
    if (init == "text") != (init_text is not None):
        raise ValueError(
            "init='text' needs init_text (the text whose token rows are averaged)"
            if init == "text"
            else f"init_text is only used with init='text', got init={init!r}"
        )
    tokenizer = _tokenizer_of(processor_or_tokenizer)
    model, embeddings, head = _embedding_and_head(model)
    tied = head is not None and head.weight is embeddings.weight
    untied_head = head if head is not None and not tied else None

    n_tokens_before = len(tokenizer)
    vocab_before = tokenizer.get_vocab()
    emb_rows = num_rows(embeddings.weight)
    head_rows = num_rows(untied_head.weight) if untied_head is not None else emb_rows

    text_ids: list[int] | None = None
    if init_text is not None:
        if not init_text.strip():
            raise ValueError("init_text is empty: give the text whose token rows initialise the new tokens")
        text_ids = list(tokenizer.encode(init_text, add_special_tokens=False))
        new_in_text = [t for t in tokens if t in init_text and t not in vocab_before]
        if new_in_text:
            raise ValueError(f"init_text {init_text!r} contains the tokens being added {new_in_text}")
        too_high = [i for i in text_ids if i >= min(emb_rows, head_rows)]
        if too_high:
            raise ValueError(
                f"init_text {init_text!r} has token ids {too_high} without a row in the embedding ({emb_rows} rows) "
                f"or lm_head ({head_rows} rows); choose a text of ordinary vocabulary"
            )

    tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    fresh = {i for token, i in zip(tokens, ids, strict=True) if token not in vocab_before}
    needed = max(ids) + 1

    # 1. Make room: reuse spare rows when the ids fit, otherwise grow the tables.
    if needed > emb_rows or needed > head_rows:
        if untied_head is None or emb_rows == head_rows:
            model.resize_token_embeddings(needed, mean_resizing=False)
        else:
            _grow_separately(model, embeddings, untied_head, needed, emb_rows, head_rows)
        embeddings = model.get_input_embeddings()
        head = model.get_output_embeddings()
        untied_head = head if head is not None and not tied else None
    new_head_rows = num_rows(untied_head.weight) if untied_head is not None else num_rows(embeddings.weight)

    # 2. Initialise the rows of the tokens added now, and of ids that had no row before.
    emb_init = sorted(fresh | {i for i in ids if i >= emb_rows})
    head_init = sorted(fresh | {i for i in ids if i >= head_rows}) if untied_head is not None else []
    filler = [i for i in range(head_rows, new_head_rows) if i not in set(head_init)] if untied_head is not None else []
    if not (emb_init or head_init or filler):
        return ids
    params = [embeddings.weight] + ([untied_head.weight] if untied_head is not None else [])
    if any(p.is_meta for p in params):  # built on the meta device (`apps/cli plan`): the rows exist, no values to write
        return ids
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad(), gathered(params, modifier_rank=0) as writes:
        if writes:
            real = min(n_tokens_before, emb_rows)
            rows = _new_rows(embeddings.weight, len(emb_init), real, init, text_ids, generator)
            _write(embeddings.weight, emb_init, rows)
            if untied_head is not None:
                real = min(n_tokens_before, head_rows)
                rows = _new_rows(untied_head.weight, len(head_init), real, init, text_ids, generator)
                _write(untied_head.weight, head_init, rows)
                mean = _new_rows(untied_head.weight, len(filler), real, "mean", None, None)
                _write(untied_head.weight, filler, mean)
    return ids


def _grow_separately(
    model: transformers.PreTrainedModel,
    embeddings: nn.Module,
    head: nn.Module,
    needed: int,
    emb_rows: int,
    head_rows: int,
) -> None:
    """Grow an ``lm_head`` that has fewer rows than the embedding (mllama: embedding = vocab_size + 8 rows).

    The head grows to ``needed`` outputs and ``vocab_size`` follows it; the embedding keeps its extra rows
    (``rows - vocab_size``) so that the model class rebuilds the same shapes when it is loaded again.
    """
    text_config = model.config.get_text_config()
    extra = emb_rows - head_rows
    new_head_rows = max(head_rows, needed)
    new_emb_rows = max(emb_rows, needed, new_head_rows + extra)
    if new_emb_rows != emb_rows:
        model.set_input_embeddings(model._get_resized_embeddings(embeddings, new_emb_rows, mean_resizing=False))
    if new_head_rows != head_rows:
        new_head = model._get_resized_lm_head(head, new_head_rows, mean_resizing=False)
        new_head.requires_grad_(head.weight.requires_grad)
        model.set_output_embeddings(new_head)
    if getattr(text_config, "vocab_size", None) == head_rows:
        text_config.vocab_size = new_head_rows
    if getattr(model, "vocab_size", None) == head_rows:
        model.vocab_size = new_head_rows


def trainable_token_indices(model: nn.Module, token_ids: Sequence[int]) -> list[int] | dict[str, list[int]]:
    """The ``LoraConfig(trainable_token_indices=...)`` value that trains exactly the rows of ``token_ids``.

    Heima trains its thinking-token rows under LoRA this way (METHODS.md section 1: PEFT's
    ``trainable_token_indices``, not ``modules_to_save`` on the whole table).

    - Tied ``lm_head`` (Qwen2.5-VL, LaRe's LLaVA): a list of ids. PEFT wraps the input embedding and, because the
      config says the weights are tied, the ``lm_head`` with the *same* token adapter.
    - Untied ``lm_head`` (Llama, Vicuna/LLaVA-NeXT, mllama): ``{embedding_name: ids, lm_head_name: ids}`` with the
      modules' full dotted names in the transformers model (PEFT matches them by suffix, also inside a PeftModel).
      Both tables get their own trainable rows, so the new tokens can be read *and* generated.

    Raises:
        ValueError: an id without a row in the embedding or the ``lm_head`` (call :func:`add_special_tokens` first),
            or an empty list.
    """
    ids = [int(i) for i in token_ids]
    if not ids:
        raise ValueError("token_ids is empty: pass the ids add_special_tokens returned")
    base = _unwrap_peft(model)
    if not isinstance(base, transformers.PreTrainedModel):
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    names = {id(module): name for name, module in base.named_modules()}
    emb_weight = getattr(embeddings, "weight", None)
    if emb_weight is None or id(embeddings) not in names:
        raise ValueError(f"{type(base).__name__} has no input embeddings to train rows of")
    for what, module in (("input embedding", embeddings), ("lm_head", head)):
        if module is not None and max(ids) >= num_rows(module.weight):
            raise ValueError(
                f"token id {max(ids)} has no row in the {what} ({num_rows(module.weight)} rows); "
                "add the tokens with add_special_tokens before building the adapter"
            )
    if min(ids) < 0:
        raise ValueError(f"token ids must be >= 0, got {min(ids)}")
    if head is None or head.weight is emb_weight:
        return ids
    return {names[id(embeddings)]: ids, names[id(head)]: list(ids)}
