"""Trainable rows for new tokens that work on any device, DeepSpeed ZeRO-3 on CPU included.

PEFT's ``trainable_token_indices`` is the light way to train the rows of new tokens under LoRA (METHODS.md section 1),
but PEFT 0.21.2 cannot start it under ZeRO-3 without CUDA: ``TrainableTokensLayer._collect_token_weights`` builds its
broadcast buffer on ``torch.device("cuda", ...)`` (ANCHORS.md). :class:`TrainableRows` is the same math done by a small
module of our own, so that the new rows also train where PEFT's route cannot start.

How it works (no class patching, the embedding and ``lm_head`` weights are never replaced):

- ``rows`` (``[n_new, d]``) starts as the current embedding rows of ``token_ids``. A forward hook on the input
  embedding replaces the output at every position whose input id is one of ``token_ids`` by ``rows[index]``; the
  embedding's own input *is* the ids tensor, so the hook knows where the new tokens are.
- A forward hook on ``lm_head`` replaces the logit columns ``token_ids`` by ``hidden @ head_rows.T`` (plus
  ``head_bias`` when ``lm_head`` has a bias). An untied head gets its own ``head_rows`` (initialised from its rows); a
  tied head uses ``rows`` for the columns too, as PEFT ties the ``lm_head`` token adapter to the embedding's.
- When LoRA adapts ``lm_head`` (or anything wraps it), the hook sits on the innermost base ``nn.Linear``: LoRA's
  update is added on top of the replaced columns, as with PEFT, whose token wrapper sits inside the LoRA layer.

This equals PEFT's ``TrainableTokensLayer`` in a single process (tests: after 3 AdamW steps in float64 the logits of
the two routes agree to ~1e-16; in float32 to ~1e-6). PEFT embeds with a weight whose rows ``token_ids`` are replaced
by its delta, and projects with such a weight in ``lm_head``. One difference: PEFT's ``lm_head`` path calls
``F.linear`` without the bias, dropping a head bias for *every* column; here the base layer keeps its bias and the new
columns get ``head_bias``. The supported families have bias-free heads, where both agree.

Why this is ZeRO-3 safe:

- The module is a registered child of the top-level transformers model (``model.latent_trainable_rows``), so the
  optimizer, ``model.parameters()`` and DeepSpeed see its parameters; ``deepspeed.initialize`` converts parameters
  created outside ``zero.Init`` (as these are) into partitioned ZeRO parameters.
- ZeRO-3 gathers a module's partitioned parameters in that module's own forward pre-hook, and re-gathers them for
  backward through hooks on its outputs. The hooks therefore never touch the parameters directly: they *call* the
  module (``trainable_rows(ids, output, kind="embed")``), whose ``forward`` reads the parameters. The hooks never
  read the (partitioned) embedding or ``lm_head`` weights either; they only replace values in the outputs.
- ``rows`` always enters the graph (also when a batch holds none of the new tokens), so every rank produces a
  gradient for it every step.
- Reading the initial rows (:func:`attach_trainable_rows`) and writing them back (:func:`merge_trainable_rows`) happen
  inside ``deepspeed.zero.GatheredParameters``.

Checked by hand on 2 CPU processes (torchrun, gloo, DeepSpeed ZeRO-3, base model loaded partitioned under
``HfDeepSpeedConfig``): ``prepare_lora_model(rows_route="auto")`` chose this route, DeepSpeed partitioned the rows, 3
AdamW steps and a ZeRO-3 :func:`merge_trainable_rows` gave logits within 2.4e-7 of the same training in one process;
PEFT's route failed there at start (``torch.cuda`` in ``_collect_token_weights``).

Parameter names (a trainer saves every trainable non-LoRA parameter by name): in the module, ``rows``, ``head_rows``
(untied head only) and ``head_bias`` (head with a bias only); in the model, prefixed by ``latent_trainable_rows.``
(``base_model.model.latent_trainable_rows.rows`` inside a ``PeftModel``). ``token_ids`` is a non-persistent buffer, so
``TrainableRows.state_dict()`` holds exactly those parameters; load them into a freshly attached module (same token
ids) with ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from latent_core.families import _unwrap_peft
from latent_core.zero3 import gathered, num_rows

__all__ = [
    "TRAINABLE_ROWS_NAME",
    "TrainableRows",
    "attach_trainable_rows",
    "detach_trainable_rows",
    "get_trainable_rows",
    "merge_trainable_rows",
]

TRAINABLE_ROWS_NAME = "latent_trainable_rows"
"""Attribute name of the :class:`TrainableRows` child on the top-level transformers model."""


class TrainableRows(nn.Module):
    """The trainable rows of new tokens for the input embedding and ``lm_head`` (see the module docstring).

    Build it with :func:`attach_trainable_rows`; the constructor only holds tensors and knows nothing of a model.

    Args:
        token_ids: the new token ids (distinct), in the order of the rows.
        rows: ``[n_new, d]`` initial embedding rows.
        head_rows: ``[n_new, d]`` initial ``lm_head`` rows of an untied head, ``None`` for a tied head (``rows`` serves
            both).
        head_bias: ``[n_new]`` initial ``lm_head`` bias entries, ``None`` when ``lm_head`` has no bias.

    Attributes:
        rows, head_rows, head_bias: the trainable parameters (``head_rows`` / ``head_bias`` are ``None`` when absent).
        token_ids: ``[n_new]`` long buffer (not saved in the state dict).
        tied: whether ``rows`` also gives the ``lm_head`` columns.
    """

    token_ids: torch.Tensor

    def __init__(
        self,
        token_ids: Sequence[int],
        rows: torch.Tensor,
        head_rows: torch.Tensor | None = None,
        head_bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        ids = [int(i) for i in token_ids]
        if rows.dim() != 2 or rows.shape[0] != len(ids):
            raise ValueError(f"rows must be [n_new={len(ids)}, d], got {tuple(rows.shape)}")
        if head_rows is not None and head_rows.shape != rows.shape:
            raise ValueError(f"head_rows must be shaped like rows {tuple(rows.shape)}, got {tuple(head_rows.shape)}")
        if head_bias is not None and tuple(head_bias.shape) != (len(ids),):
            raise ValueError(f"head_bias must be [n_new={len(ids)}], got {tuple(head_bias.shape)}")
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long, device=rows.device), persistent=False)
        self.rows = nn.Parameter(rows.detach().clone())
        self.head_rows = nn.Parameter(head_rows.detach().clone()) if head_rows is not None else None
        self.head_bias = nn.Parameter(head_bias.detach().clone()) if head_bias is not None else None

    @property
    def tied(self) -> bool:
        return self.head_rows is None

    def extra_repr(self) -> str:
        return f"token_ids={self.token_ids.tolist()}, d={self.rows.shape[1]}, tied={self.tied}"

    def forward(
        self, inputs: torch.Tensor, base_output: torch.Tensor, kind: str, scale: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """Replace the new tokens' values in ``base_output``; called by the hooks, not meant to be called on its own.

        Args:
            inputs: the hooked module's input: token ids (``kind="embed"``) or hidden states (``kind="head"``).
            base_output: what the hooked module returned: embeddings ``[..., d]`` or logits ``[..., vocab]``.
            kind: ``"embed"`` or ``"head"``.
            scale: the embedding's ``embed_scale`` if it scales looked-up rows (Gemma-like), else ``None``.
        """
        if kind == "embed":
            match = inputs.unsqueeze(-1) == self.token_ids  # [..., n_new]
            index = match.long().argmax(-1)  # 0 where no new token: `where` discards those rows
            new = self.rows[index].to(base_output.dtype)
            if scale is not None:
                new = new * torch.as_tensor(scale, dtype=new.dtype, device=new.device)
            return torch.where(match.any(-1, keepdim=True), new, base_output)
        if kind == "head":
            weight = self.rows if self.head_rows is None else self.head_rows
            bias = None if self.head_bias is None else self.head_bias.to(inputs.dtype)
            columns = F.linear(inputs, weight.to(inputs.dtype), bias)
            return base_output.index_copy(base_output.dim() - 1, self.token_ids, columns.to(base_output.dtype))
        raise ValueError(f"kind must be 'embed' or 'head', got {kind!r}")

    # Hooks are bound methods so that `copy.deepcopy(model)` re-binds them to the copied module.
    def _embedding_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        ids = args[0] if args else kwargs["input"]
        return self(ids, output, kind="embed", scale=getattr(module, "embed_scale", None))

    def _head_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        hidden = args[0] if args else kwargs["input"]
        return self(hidden, output, kind="head")


def _base_module(module: nn.Module, what: str) -> nn.Module:
    """The innermost base layer of a (possibly LoRA-wrapped) Embedding/Linear."""
    for _ in range(8):
        if "token_adapter" in module._modules:
            raise ValueError(
                f"the {what} is wrapped by PEFT's trainable_token_indices (TrainableTokensWrapper); the new rows are "
                "already trained by PEFT. Use one route: drop trainable_token_indices from the LoraConfig, or do not "
                "attach TrainableRows"
            )
        inner = module._modules.get("base_layer")
        if inner is None:
            break
        module = inner
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise ValueError(f"the {what} ({type(module).__name__}) has no weight to take rows from")
    return module


def _base_model(model: nn.Module) -> transformers.PreTrainedModel:
    base = _unwrap_peft(model)
    if not isinstance(base, transformers.PreTrainedModel):
        raise TypeError(f"expected a transformers model (or a PEFT model around one), got {type(model).__name__}")
    return base


def _embedding_and_head(base: transformers.PreTrainedModel) -> tuple[nn.Module, nn.Module | None]:
    embedding = _base_module(base.get_input_embeddings(), "input embedding")
    head = base.get_output_embeddings()
    return embedding, (_base_module(head, "lm_head") if head is not None else None)


def get_trainable_rows(model: nn.Module) -> TrainableRows | None:
    """The :class:`TrainableRows` attached to ``model`` (a transformers or PEFT model), ``None`` if there is none."""
    module = _base_model(model)._modules.get(TRAINABLE_ROWS_NAME)
    return module if isinstance(module, TrainableRows) else None


def attach_trainable_rows(model: nn.Module, token_ids: Sequence[int]) -> TrainableRows:
    """Make the embedding (and ``lm_head``) rows of ``token_ids`` trainable through a :class:`TrainableRows` child.

    The rows start as the model's current rows (read inside ``GatheredParameters`` under ZeRO-3); the base embedding and
    ``lm_head`` are left as they are (freeze them yourself, or use :func:`latent_core.lora.prepare_lora_model`).
    Attach after ``get_peft_model`` (PEFT freezes every non-adapter parameter it finds) and before the optimizer or
    ``deepspeed.initialize`` is built.

    Args:
        model: a transformers model, or a PEFT model around one; the module is registered on the transformers model
            as ``latent_trainable_rows``.
        token_ids: the new token ids (from :func:`latent_core.tokens.add_special_tokens`).

    Returns:
        The attached module (its parameters require grad).

    Raises:
        ValueError: empty, repeated or out-of-range ids; rows already attached; rows already trained by PEFT's
            ``trainable_token_indices``.
    """
    base = _base_model(model)
    ids = [int(i) for i in token_ids]
    if not ids:
        raise ValueError("token_ids is empty: pass the ids add_special_tokens returned")
    if len(set(ids)) != len(ids):
        raise ValueError(f"token_ids lists an id more than once: {ids}")
    if get_trainable_rows(base) is not None:
        raise ValueError(
            f"{type(base).__name__} already has trainable rows attached; detach_trainable_rows(model) or "
            "merge_trainable_rows(model) first"
        )
    embedding, head = _embedding_and_head(base)
    for what, module in (("input embedding", embedding), ("lm_head", head)):
        if module is not None and (min(ids) < 0 or max(ids) >= num_rows(module.weight)):
            raise ValueError(
                f"token ids {ids} need rows in the {what} ({num_rows(module.weight)} rows); add the tokens with "
                "add_special_tokens first"
            )
    tied = head is None or head.weight is embedding.weight
    bias = getattr(head, "bias", None) if head is not None else None
    params = [embedding.weight] + ([head.weight] if head is not None else []) + ([bias] if bias is not None else [])
    with torch.no_grad(), gathered(params, modifier_rank=None):
        index = torch.tensor(ids, device=embedding.weight.device)
        rows = embedding.weight[index].detach().clone()
        head_rows = None if tied else head.weight[index.to(head.weight.device)].detach().clone()
        head_bias = None if bias is None else bias[index.to(bias.device)].detach().clone()
    trainable = TrainableRows(ids, rows, head_rows, head_bias)
    trainable.requires_grad_(True)
    base.add_module(TRAINABLE_ROWS_NAME, trainable)
    embedding.register_forward_hook(trainable._embedding_hook, with_kwargs=True)
    if head is not None:
        head.register_forward_hook(trainable._head_hook, with_kwargs=True)
    return trainable


def detach_trainable_rows(model: nn.Module) -> TrainableRows:
    """Remove the hooks and the ``latent_trainable_rows`` child without writing the rows anywhere; return the module.

    Raises:
        ValueError: no trainable rows are attached.
    """
    base = _base_model(model)
    trainable = get_trainable_rows(base)
    if trainable is None:
        raise ValueError(f"{type(base).__name__} has no trainable rows attached (attach_trainable_rows)")
    for module in base.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__self__", None) is trainable:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
    del base._modules[TRAINABLE_ROWS_NAME]
    return trainable


def merge_trainable_rows(model: nn.Module) -> None:
    """Write the trained rows into the embedding and ``lm_head`` weights, then detach (hooks and child removed).

    The logits do not change. With a tied head the rows are written once into the shared table. Under ZeRO-3 the
    writes happen inside ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``: rank 0 writes and the context
    broadcasts on exit. Meant for the end of training (export): an optimizer built before still holds the rows'
    parameters.

    Raises:
        ValueError: no trainable rows are attached.
    """
    base = _base_model(model)
    trainable = get_trainable_rows(base)
    if trainable is None:
        raise ValueError(f"{type(base).__name__} has no trainable rows attached (attach_trainable_rows)")
    embedding, head = _embedding_and_head(base)
    targets: list[tuple[torch.Tensor, torch.Tensor]] = [(embedding.weight, trainable.rows)]
    if head is not None and trainable.head_rows is not None:
        targets.append((head.weight, trainable.head_rows))
    if head is not None and trainable.head_bias is not None:
        targets.append((head.bias, trainable.head_bias))
    params = [t for pair in targets for t in pair]
    with torch.no_grad(), gathered(params, modifier_rank=0) as writes:
        if writes:
            for weight, source in targets:
                index = trainable.token_ids.to(weight.device)
                weight.data.index_copy_(0, index, source.data.to(device=weight.device, dtype=weight.dtype))
    detach_trainable_rows(base)
