"""DeepSpeed ZeRO-3 helpers, one copy for every mechanism (token surgery, trainable rows, the trainer, latent loops).

Under ZeRO-3 a parameter is partitioned across processes: its local ``.shape`` is ``(0,)`` and the full shape lives
in ``ds_shape``. Read sizes with :func:`full_shape` / :func:`num_rows` (or from the config), never from
``weight.shape``; read or write full values inside :func:`gathered`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["full_shape", "gathered", "is_partitioned", "num_rows", "zero3_enabled"]


def zero3_enabled() -> bool:
    """Whether the HF DeepSpeed integration runs ZeRO-3 in this process."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def is_partitioned(tensor: Any) -> bool:
    """Whether ``tensor`` is a ZeRO-3 partitioned parameter (it has a DeepSpeed id)."""
    return hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The full shape of a (possibly ZeRO-3 partitioned) tensor: ``ds_shape`` there, ``.shape`` otherwise."""
    shape = getattr(tensor, "ds_shape", None)
    return torch.Size(shape) if shape is not None else tensor.shape


def num_rows(weight_or_module: torch.Tensor | nn.Module) -> int:
    """Rows of a (possibly partitioned) weight, or of the weight of a (possibly PEFT-wrapped) Embedding/Linear."""
    weight = weight_or_module
    if isinstance(weight_or_module, nn.Module):
        from latent_core.families import _weight_of

        weight = _weight_of(weight_or_module)
        if weight is None:
            raise ValueError(f"{type(weight_or_module).__name__} holds no weight")
    return int(full_shape(weight)[0])


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = 0) -> Iterator[bool]:
    """Full values of ``params`` inside the body (``deepspeed.zero.GatheredParameters`` under ZeRO-3, nothing
    otherwise); yields whether this process may write them: the ``modifier_rank`` process, whose writes are broadcast
    and re-partitioned on exit (every process when ``modifier_rank`` is ``None``: read-only), always without ZeRO-3."""
    params = list({id(p): p for p in params}.values())
    if not (zero3_enabled() or any(is_partitioned(p) for p in params)):
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        yield modifier_rank is None or rank == modifier_rank
