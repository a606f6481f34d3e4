"""One trainer for every method: HF ``Trainer`` + PEFT + DeepSpeed (ZeRO-2/3, offload), like TRL's trainers.

- :class:`LatentTrainingArguments` extends ``transformers.TrainingArguments``: ``--deepspeed`` also takes a shipped
  config by name (``zero2``, ``zero3``, ``zero3_offload``), and ``loss_weights`` weighs auxiliary losses by name
  (a method's config adds typed fields ``<name>_weight`` instead, e.g. LaViT's lambda).
- :class:`LatentTrainer` extends ``transformers.Trainer``. The model returns a next-token loss (``loss``) and,
  optionally, ``aux_losses``: a dict of named scalar losses. The optimised loss is
  ``loss + sum_name weight(name) * aux_losses[name]``; every term is logged by name (``ntp_loss``,
  ``<name>_loss``) next to HF's total ``loss``.
- **What is saved**, by the kind of stage:

  - *adapter* (a PEFT model inside): the adapter (``adapter_model.safetensors``);
  - *full-weight* (no adapter, some of the transformers model's own weights train: LaViT's student LLM, LaRe's
    stages III-IV): those trainable weights only, in ``stage_weights.safetensors`` keyed by their names in the
    transformers model; the frozen parts (vision tower, ...) are not copied but referenced by the base id in
    ``latent_stage.json``;
  - *standalone* (a bare transformers model whose every weight trains: the bases of ``make-base``): a standard
    ``save_pretrained`` checkpoint.

  Besides, every other trainable parameter (new-token rows, projection heads, extractors, projectors: anything
  registered in the trainer's model with ``requires_grad`` and outside the transformers model / adapter) goes to
  ``extra_modules.safetensors``, keyed by parameter name, plus ``latent_stage.json`` (kind, tokens, extra keys,
  base model). Under ZeRO-3 only the trainable parameters are gathered for saving. A killed run resumes from its
  last checkpoint: the weights above in one process, DeepSpeed's own engine checkpoint (optimizer partitions
  included) under DeepSpeed.
- **Stage chaining**: :func:`load_stage` continues from a previous stage's output directory of either kind
  (adapter + extra modules + tokens, or full weights), for Heima's progressive stages and LaRe's four stages; a
  missing or incompatible stage fails with a message naming what is missing.
- :func:`schedule_callback` turns ``fn(step)`` into a callback run before every optimizer step (LaViT's gate
  gamma(t), Eq. 5).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from latent_core.cli import other_accelerator
from latent_core.hub import check_tensors, load_tensors
from latent_core.trainable_rows import TRAINABLE_ROWS_NAME
from latent_core.zero3 import num_rows

__all__ = [
    "DEEPSPEED_CONFIGS",
    "EXTRA_MODULES_NAME",
    "LatentModel",
    "STAGE_INFO_NAME",
    "STAGE_WEIGHTS_NAME",
    "LatentTrainer",
    "LatentTrainingArguments",
    "StageError",
    "deepspeed_config",
    "extra_state_dict",
    "load_base",
    "load_extra_modules",
    "load_stage",
    "saved_token_rows",
    "schedule_callback",
]

logger = logging.getLogger(__name__)

DEEPSPEED_CONFIGS: tuple[str, ...] = ("zero2", "zero3", "zero3_offload")
EXTRA_MODULES_NAME = "extra_modules.safetensors"
STAGE_WEIGHTS_NAME = "stage_weights.safetensors"
STAGE_INFO_NAME = "latent_stage.json"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Set on the transformers model by load_stage: the full-weight stages applied to it (absolute paths, in order). A
# stage saved from it names them ("previous_stages"), so loading that stage re-applies them first: a stage that
# trains only an extractor on top of a trained LLM still restores that LLM.
_STAGES_ATTR = "_latent_stages"
_WEIGHT_FILES = ("adapter_model.safetensors", STAGE_WEIGHTS_NAME, "model.safetensors", "model.safetensors.index.json")


class StageError(ValueError):
    """A previous stage's output directory that is missing or does not fit the model being trained."""


def deepspeed_config(name_or_path: str | os.PathLike) -> str:
    """Path of a DeepSpeed config: a shipped one by name (``zero2``, ``zero3``, ``zero3_offload``; all use
    ``"auto"`` values that the HF integration fills from the training arguments) or an existing JSON file."""
    name = str(name_or_path)
    if name in DEEPSPEED_CONFIGS:
        return str(resources.files("latent_core") / "deepspeed_configs" / f"{name}.json")
    if os.path.isfile(name):
        return name
    raise ValueError(
        f"--deepspeed {name!r} is neither a shipped config ({', '.join(DEEPSPEED_CONFIGS)}) nor an existing JSON file"
    )


@dataclass
class LatentTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus named auxiliary-loss weights and DeepSpeed configs by name.

    A method's config subclasses this with typed ``<name>_weight`` fields (paper defaults, help naming the table);
    :meth:`loss_weight` reads those first, then ``loss_weights``.
    """

    loss_weights: dict[str, float] | None = field(
        default=None,
        metadata={"help": "Weight of each auxiliary loss the model returns, by name (e.g. {'concept': 0.3})."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision: fp32 master copies of the trained weights, bf16 compute under autocast "
            "(frozen weights may stay in bf16). None = on iff CUDA supports bf16."
        },
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Keep the intermediate checkpoint-N folders (weights + optimizer state, only for resuming a "
            "killed run) after the final save; by default train_and_save deletes them once the stage is saved."
        },
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if isinstance(self.deepspeed, str) and not self.deepspeed.lstrip().startswith("{"):
            self.deepspeed = deepspeed_config(self.deepspeed)
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids torch's warning on every CPU run
            if self.bf16 and not other_accelerator():
                self.use_cpu = True  # bf16 autocast on the CPU (HF refuses bf16 without a GPU unless told "CPU")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not other_accelerator():
                # Launched on several CPU processes (torchrun / the deepspeed launcher): say "CPU" explicitly, so that
                # accelerate sets the processes up with gloo; left implicit it finds no backend, counts one process,
                # and DeepSpeed's `auto` batch sizes come out wrong ("train_batch_size 6 != 6 * 1 * 2").
                self.use_cpu = True
                if self.ddp_backend is None:
                    self.ddp_backend = "gloo"
        super().__post_init__()
        if self.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
            # A base loaded under ZeRO-3 before the Trainer exists (the method CLIs) is partitioned by DeepSpeed's
            # own communication layer: attach it to the process group accelerate set up (on CPU accelerate does not).
            import deepspeed

            if not deepspeed.comm.is_initialized():
                deepspeed.init_distributed(dist_backend=self.ddp_backend or "gloo", auto_mpi_discovery=False)

    def loss_weight(self, name: str) -> float:
        """The weight of auxiliary loss ``name``: field ``<name>_weight``, else ``loss_weights[name]``."""
        value = getattr(self, f"{name}_weight", None)
        if value is None and self.loss_weights is not None:
            value = self.loss_weights.get(name)
        if value is None:
            raise KeyError(
                f"the model returned auxiliary loss {name!r} but the training arguments give it no weight: add a "
                f"field '{name}_weight' to the method's config or loss_weights={{'{name}': ...}}"
            )
        return float(value)


def schedule_callback(fn: Callable[[int], Any]) -> TrainerCallback:
    """A callback calling ``fn(global_step)`` before every optimizer step (e.g. set LaViT's gate gamma(t))."""

    class _Schedule(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            fn(state.global_step)

        def on_step_begin(self, args, state, control, **kwargs):
            fn(state.global_step)

    return _Schedule()


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading what PEFT does not save
# ---------------------------------------------------------------------------------------------------------------


def _vocabulary_changed(peft_model: Any, tokens: Sequence[str] = ()) -> bool:
    """Whether an adapter must carry the whole embedding / ``lm_head`` tables to be reloaded exactly.

    Not when a trainable-token route (PEFT ``trainable_token_indices`` / ``TrainableRows``) holds the rows of every
    added token: those rows are saved as rows, and the rest of a grown table is what :func:`add_special_tokens`
    re-creates on reload (the base rows, mean-initialised filler rows). Not either when the vocabulary is the base's
    and ``tokens`` (the stage's added tokens) are all in the base tokenizer: PEFT's ``"auto"`` would save the whole
    ``lm_head`` whenever LoRA targets it (~1 GB on Llama-3.1-8B per stage) although the LoRA weights alone restore
    it. Otherwise (new rows no route saves, or an unknown base): saved, to be safe."""
    from latent_core.hub import load_config, load_processor

    config = peft_model.peft_config[peft_model.active_adapter]
    trained = (_rows_record(peft_model) or {}).get("token_ids") or []
    if tokens and len(set(trained)) >= len(set(tokens)):
        return False
    base_id = getattr(config, "base_model_name_or_path", None)
    if not base_id:
        return True
    try:
        if peft_model.get_base_model().config.get_text_config().vocab_size != (
            load_config(str(base_id)).get_text_config().vocab_size
        ):
            return True
        if tokens and not trained:
            processor = load_processor(str(base_id))
            vocab = getattr(processor, "tokenizer", processor).get_vocab()
            return any(token not in vocab for token in tokens)
    except (OSError, ValueError):
        return True
    return False


def _peft_model(model: nn.Module):
    """The PeftModel inside ``model`` (the model itself, or a submodule), and its attribute path prefix."""
    from peft import PeftModel

    for name, module in model.named_modules():
        if isinstance(module, PeftModel):
            return module, (name + "." if name else "")
    return None, ""


def _transformers_model(model: nn.Module) -> tuple[PreTrainedModel | None, str]:
    """The transformers model a method trains (the model itself, or the first ``PreTrainedModel`` inside it, e.g.
    ``LatentModel.backbone``) and its attribute path prefix."""
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return module, (name + "." if name else "")
    return None, ""


def _copy_into(model: nn.Module, path: Path, skip: Sequence[str] = ()) -> list[str]:
    """Copy the tensors of the safetensors file ``path`` into ``model``'s parameters of the same names; returns the
    names. Every key must exist with its shape (checked from the header first). One tensor is read and, under
    ZeRO-3, one parameter gathered at a time (only the writing rank reads it), so a large stage never sits whole in
    memory on every rank.

    Raises:
        StageError: a key the model lacks or has with another shape.
        CheckpointError: the file is missing, truncated or not safetensors (its path in the message).
    """
    from safetensors import SafetensorError, safe_open

    from latent_core.hub import CheckpointError
    from latent_core.zero3 import full_shape, gathered

    check_tensors(path)
    params = dict(model.named_parameters())
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = [k for k in handle.keys() if not any(part in k for part in skip)]
            missing = [k for k in keys if k not in params]
            if missing:
                raise StageError(
                    f"{path} holds {missing[:5]} which the model does not have: attach the same extra modules "
                    "(heads, trainable token rows) and add the same tokens before loading the stage"
                )
            for key in keys:
                shape = tuple(handle.get_slice(key).get_shape())
                if tuple(full_shape(params[key])) != shape:
                    raise StageError(
                        f"{path}: {key} has shape {shape}, the model's is {tuple(full_shape(params[key]))}"
                    )
            for key in keys:
                param = params[key]
                with gathered([param], modifier_rank=0) as may_write, torch.no_grad():
                    if may_write:
                        param.copy_(handle.get_tensor(key).to(param.dtype))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({err})") from None
    return keys


def _rows_record(peft_model: Any) -> dict[str, Any] | None:
    """How the new-token rows of ``peft_model`` train (``latent_stage.json``'s ``trainable_rows``): the route and
    the token ids in the order of the saved rows, so that :func:`saved_token_rows` can read them back under any
    route; ``None`` when no rows train."""
    from latent_core.trainable_rows import get_trainable_rows

    rows = get_trainable_rows(peft_model)
    if rows is not None:
        return {"route": "rows", "token_ids": [int(i) for i in rows.token_ids.tolist()]}
    indices = getattr(peft_model.peft_config[peft_model.active_adapter], "trainable_token_indices", None)
    if not indices:
        return None
    first = next(iter(indices.values())) if isinstance(indices, Mapping) else indices
    return {"route": "peft", "token_ids": [int(i) for i in first]}


def _applied_stages(model: nn.Module) -> list[str]:
    """The full-weight stages :func:`load_stage` copied into the transformers model inside ``model``, in order."""
    base, _ = _transformers_model(model)
    return list(getattr(base, _STAGES_ATTR, [])) if base is not None else []


def _saved_by_peft(name: str) -> bool:
    return ".lora_" in name or "trainable_tokens_" in name or ".modules_to_save." in name


def extra_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None, exclude_prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Every trainable parameter that the PEFT adapter does not hold (new-token rows, heads, extractors,
    projectors), by name; ``exclude_prefix``: also not those under it (a full-weight stage's transformers model).
    ``state_dict`` (e.g. gathered from ZeRO-3) supplies the values when given."""
    names = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad
        and not _saved_by_peft(n)
        and not (exclude_prefix is not None and n.startswith(exclude_prefix))
    ]
    source = dict(state_dict) if state_dict is not None else dict(model.named_parameters())
    missing = [n for n in names if n not in source]
    if missing:
        raise KeyError(f"trainable parameters missing from the state dict to save: {missing[:5]}")
    return {n: source[n].detach().to("cpu").contiguous() for n in names}


def load_extra_modules(model: nn.Module, directory: str | os.PathLike, *, skip_token_rows: bool = False) -> list[str]:
    """Load ``extra_modules.safetensors`` of ``directory`` into ``model`` (every key must exist with its shape).

    Modules the model has but the stage did not save (a later stage adding a head) keep their initialisation.
    ``skip_token_rows``: leave out the ``TrainableRows`` keys (``latent_trainable_rows.*``), for a model that
    :func:`load_stage` gave the stage's token rows already (``token_ids=``: they are in its tables, whatever route
    trains them now).

    Raises:
        StageError: the stage saved extra parameters that ``model`` lacks or has with another shape.
    """
    path = Path(directory) / EXTRA_MODULES_NAME
    if not path.is_file():
        return []
    skip = (f"{TRAINABLE_ROWS_NAME}.",) if skip_token_rows else ()
    return sorted(_copy_into(model, path, skip=skip))


# ---------------------------------------------------------------------------------------------------------------
# New-token rows across routes: a stage trained under one route (PEFT's trainable_token_indices, or TrainableRows
# under ZeRO-3 without CUDA) must continue under the other (1 process <-> N processes).
# ---------------------------------------------------------------------------------------------------------------

_PEFT_ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def _peft_row_ids(indices: Any, module_name: str) -> list[int]:
    """The ids of PEFT's ``trainable_token_indices`` (a list, or module name -> list) for ``module_name``."""
    if isinstance(indices, Mapping):
        for name, ids in indices.items():
            name = name.replace(".base_layer", "")
            if module_name == name or module_name.endswith("." + name) or name.endswith("." + module_name):
                return [int(i) for i in ids]
        raise StageError(f"trainable_token_indices {dict(indices)} name no entry for {module_name}")
    return [int(i) for i in indices]


def saved_token_rows(directory: str | os.PathLike, model: nn.Module) -> dict[str, Any] | None:
    """The new-token rows a stage trained, whichever route trained them: ``{"route", "token_ids", "embed",
    "head", "head_bias"}`` (``head`` / ``head_bias``: ``None`` when the head is tied / has no bias), or ``None`` when
    the stage trained no rows.

    ``"rows"``: :class:`~latent_core.trainable_rows.TrainableRows` in ``extra_modules.safetensors``, in the order of
    ``latent_stage.json``'s ``trainable_rows.token_ids``; ``"peft"``: the ``trainable_tokens_delta`` tensors in the
    adapter, in the order of ``adapter_config.json``'s ``trainable_token_indices``. ``model`` is the bare transformers
    model the stage is loaded onto (it tells the embedding's entry from the head's).

    Raises:
        StageError: rows saved without their token ids (a stage written before the ids were recorded).
    """
    from safetensors import safe_open

    directory = Path(directory)
    extras = directory / EXTRA_MODULES_NAME
    if extras.is_file():
        check_tensors(extras)
        with safe_open(str(extras), framework="pt") as handle:
            keys = [k for k in handle.keys() if f"{TRAINABLE_ROWS_NAME}." in k]
            found = {k.rsplit(".", 1)[-1]: handle.get_tensor(k) for k in keys}
        if found:
            ids = (stage_info(directory).get("trainable_rows") or {}).get("token_ids")
            if ids is None:
                raise StageError(
                    f"{directory} saved trainable token rows without their token ids (latent_stage.json has no "
                    "trainable_rows.token_ids): retrain that stage with this version, or continue it with the "
                    "route it was trained with"
                )
            return {"route": "rows", "token_ids": [int(i) for i in ids], "embed": found["rows"],
                    "head": found.get("head_rows"), "head_bias": found.get("head_bias")}  # fmt: skip
    config_path, adapter = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not (config_path.is_file() and adapter.is_file()):
        return None
    try:
        indices = json.loads(config_path.read_text()).get("trainable_token_indices")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageError(f"{config_path} is not valid JSON ({err}): the stage output is corrupted") from None
    if not indices:
        return None
    check_tensors(adapter)
    embedding = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names[id(embedding)]
    out: dict[str, Any] = {"route": "peft", "token_ids": None, "embed": None, "head": None, "head_bias": None}
    with safe_open(str(adapter), framework="pt") as handle:
        for key in handle.keys():
            if not key.endswith(_PEFT_ROWS_SUFFIX):
                continue
            name = key[: -len(_PEFT_ROWS_SUFFIX)].removeprefix("base_model.model.")
            while name.endswith(".base_layer"):
                name = name.removesuffix(".base_layer")
            ids = _peft_row_ids(indices, name)
            part = "embed" if name == embed_name else "head"
            out[part] = handle.get_tensor(key)
            if out["token_ids"] is not None and out["token_ids"] != ids:
                raise StageError(f"{adapter}: the embedding and lm_head rows are of different tokens")
            out["token_ids"] = ids
    return out if out["embed"] is not None else None


def _copy_saved_tables(model: nn.Module, saved: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """Copy the base weights an adapter file carries (the embedding / ``lm_head`` tables PEFT's
    ``save_embedding_layers`` adds: no ``lora_`` / token-adapter / ``modules_to_save`` key) into the bare ``model``;
    return the adapter's own entries."""
    from latent_core.zero3 import full_shape, gathered

    params = dict(model.named_parameters())
    adapter: dict[str, torch.Tensor] = {}
    for key, value in saved.items():
        if _saved_by_peft(key) or key.endswith(_PEFT_ROWS_SUFFIX):
            adapter[key] = value
            continue
        name = key.removeprefix("base_model.model.").replace(".base_layer", "")
        param = params.get(name)
        if param is None or tuple(full_shape(param)) != tuple(value.shape):
            raise StageError(f"{directory}: the adapter's {key} {tuple(value.shape)} has no place in this model")
        with torch.no_grad(), gathered([param], modifier_rank=0) as writes:
            if writes:
                param.copy_(value.to(param.dtype))
    return adapter


def _write_token_rows(model: nn.Module, rows: dict[str, Any], token_ids: Sequence[int], directory: Path) -> None:
    """Write ``rows`` (:func:`saved_token_rows`) into ``model``'s embedding and untied ``lm_head`` (ZeRO-3 safe)."""
    from latent_core.zero3 import full_shape, gathered

    ids = [int(i) for i in token_ids]
    if rows["token_ids"] != ids:
        raise StageError(
            f"{directory} trained the rows of token ids {rows['token_ids']}, this model's tokens have ids {ids}: add "
            "the same tokens in the same order before loading the stage"
        )
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is embedding.weight
    targets = [(embedding.weight, rows["embed"])]
    if not tied and rows["head"] is not None:
        targets.append((head.weight, rows["head"]))
    if head is not None and rows["head_bias"] is not None and getattr(head, "bias", None) is not None:
        targets.append((head.bias, rows["head_bias"]))
    for weight, value in targets:
        if tuple(full_shape(weight)[1:]) != tuple(value.shape[1:]):
            raise StageError(f"{directory}: its token rows are {tuple(value.shape)}, the model's table is "
                             f"{tuple(full_shape(weight))}")  # fmt: skip
    with torch.no_grad(), gathered([w for w, _ in targets], modifier_rank=0) as writes:
        if writes:
            for weight, value in targets:
                index = torch.tensor(ids, device=weight.device)
                weight.data.index_copy_(0, index, value.to(device=weight.device, dtype=weight.dtype))


def load_stage(
    model: nn.Module,
    directory: str | os.PathLike,
    is_trainable: bool = True,
    *,
    token_ids: Sequence[int] | None = None,
    rows_route: str | None = None,
):
    """Continue from a previous stage's output, of either kind.

    ``model`` is the base transformers model (loaded from the stage's ``base_model``) with the stage's tokens
    already added (they are in ``latent_stage.json`` and the saved tokenizer).

    - an *adapter* stage: returns ``model`` with the stage's LoRA adapter (the same adapter keeps training unless
      ``is_trainable=False``). With ``rows_route`` (``"auto"``, ``"peft"``, ``"rows"``:
      :func:`latent_core.lora.resolve_rows_route`) and ``token_ids`` (the new tokens' ids, in the order they were
      added), the new-token rows the stage trained continue under *this* setup's route, whichever route trained
      them: a stage saved by N processes under ZeRO-3 without CUDA (``TrainableRows``) continues in one process
      (PEFT's ``trainable_token_indices``) and back. The saved rows (:func:`saved_token_rows`) are written into the
      embedding and ``lm_head`` tables first, the route's trainable copy then starts from them (PEFT's token
      adapter or a freshly attached ``TrainableRows``; load the other extra modules with
      ``load_extra_modules(..., skip_token_rows=True)``). Without ``rows_route`` the adapter loads as saved;
    - a *full-weight* stage: copies its trained weights into ``model`` (ZeRO-3 partitioned parameters too) and
      returns it; which weights train next is the caller's choice.

    The full-weight stages the stage was trained on top of (``previous_stages`` in ``latent_stage.json``) are
    copied first, in order, so a chain of stages that each train a part (LaRe's four) restores every part.

    Then build the trainer's model around it (attach the same extra modules) and call :func:`load_extra_modules` on
    it: extra parameters are keyed by their names in the model that was given to the trainer.

    Raises:
        StageError: the directory or one of its files is missing, or it does not fit ``model``.
    """
    from peft import PeftModel

    directory = Path(directory)
    if not directory.is_dir():
        raise StageError(f"previous stage output {directory} does not exist: run that stage first")
    info = stage_info(directory)
    full = info.get("kind") == "full" or (directory / STAGE_WEIGHTS_NAME).is_file()
    needed = (STAGE_WEIGHTS_NAME,) if full else _ADAPTER_FILES
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise StageError(f"previous stage output {directory} has no {', '.join(missing)}: is it a finished stage?")
    embeddings = num_rows(model.get_input_embeddings())
    if info.get("embedding_rows") and info["embedding_rows"] != embeddings:
        raise StageError(
            f"stage {directory} was trained with {info['embedding_rows']} embedding rows, the model has {embeddings}:"
            f" add its tokens {info.get('tokens', [])} first"
        )
    applied = list(getattr(model, _STAGES_ATTR, []))
    for previous in info.get("previous_stages") or []:
        if previous in applied:
            continue
        weights = Path(previous) / STAGE_WEIGHTS_NAME
        if not weights.is_file():
            raise StageError(
                f"stage {directory} builds on the full-weight stage {previous}, which has no {STAGE_WEIGHTS_NAME} "
                "(moved or deleted?): its trained weights are not in this stage; restore it at that path"
            )
        _copy_into(model, weights)
        applied.append(previous)
    if full:
        _copy_into(model, directory / STAGE_WEIGHTS_NAME)
        setattr(model, _STAGES_ATTR, [*applied, str(directory.resolve())])
        return model
    setattr(model, _STAGES_ATTR, applied)
    check_tensors(directory / "adapter_model.safetensors")  # a corrupted adapter: an error naming the file
    if rows_route is not None:
        return _load_adapter_for_route(model, directory, token_ids, rows_route, is_trainable)
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        raise StageError(f"the adapter in {directory} does not fit this model: {err}") from err
    return peft_model


def _load_adapter_for_route(
    model: nn.Module, directory: Path, token_ids: Sequence[int] | None, rows_route: str, is_trainable: bool
):
    """The stage's adapter on ``model`` with its new-token rows under this setup's rows route (see
    :func:`load_stage`): the saved rows are written into the tables, the adapter is rebuilt from its config with
    this route's ``trainable_token_indices`` (or none, and ``TrainableRows`` attached), its LoRA weights loaded."""
    import warnings

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from latent_core.lora import _TIED_WARNING, _lora_targets_head, _peft_token_indices, resolve_rows_route
    from latent_core.trainable_rows import attach_trainable_rows

    route = resolve_rows_route(rows_route)
    ids = [int(i) for i in token_ids or ()]
    saved = load_tensors(directory / "adapter_model.safetensors")
    # Vocabulary tables saved with the adapter (PEFT's save_embedding_layers) are the stage's base tables: into the
    # model first, then the trained rows on top of them.
    state = _copy_saved_tables(model, saved, directory)
    rows = saved_token_rows(directory, model)
    if rows is not None:
        if not ids:
            raise StageError(
                f"{directory} trained the rows of new tokens {rows['token_ids']}: pass their token_ids to load_stage"
            )
        _write_token_rows(model, rows, ids, directory)
    try:
        config = LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise StageError(f"{directory}/adapter_config.json is not a LoRA adapter config ({err})") from None
    config.trainable_token_indices = None
    if route == "peft" and ids:
        config.trainable_token_indices = _peft_token_indices(model, ids, _lora_targets_head(model, config))
    config.inference_mode = not is_trainable
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TIED_WARNING)
        peft_model = get_peft_model(model, config)
    # The LoRA (and modules_to_save) weights as saved; the token rows as this route holds them now (initialised from
    # the tables, which hold the saved rows).
    state = {k: v for k, v in state.items() if not k.endswith(_PEFT_ROWS_SUFFIX)}
    state.update({k: v for k, v in get_peft_model_state_dict(peft_model).items() if k.endswith(_PEFT_ROWS_SUFFIX)})
    try:
        result = set_peft_model_state_dict(peft_model, state, adapter_name=peft_model.active_adapter)
    except (RuntimeError, ValueError, KeyError) as err:
        raise StageError(f"the adapter in {directory} does not fit this model: {err}") from err
    missing = [k for k in result.missing_keys if ".lora_" in k or ".modules_to_save." in k]
    if result.unexpected_keys or missing:
        raise StageError(
            f"the adapter in {directory} does not fit this model: unexpected {result.unexpected_keys[:3]}, missing "
            f"{missing[:3]}"
        )
    if route == "rows" and ids:
        attach_trainable_rows(peft_model, ids)
    return peft_model


def load_base(
    name_or_path: str,
    model: Any = None,
    processor: Any = None,
    bf16: bool = False,
    *,
    families: tuple[str, ...] | list[str] | None = None,
    method: str = "this method",
):
    """The base ``(model, processor)`` a method trains: the ones given, a factory's (``model`` may be a
    zero-argument callable returning a model or ``(model, processor)``; tests pass tiny models this way), or
    loaded fresh from ``name_or_path`` (alias, hub id or path; bf16 when asked).

    With ``families``, a model of another family is refused before its weights load
    (:func:`latent_core.families.require_family`: the message names its family, ``method`` and the supported ones).
    """
    from latent_core.families import require_family
    from latent_core.hub import load_config, load_model, load_processor

    if model is not None and not isinstance(model, nn.Module) and callable(model):
        made = model()
        model, made_processor = made if isinstance(made, tuple) else (made, None)
        processor = processor if processor is not None else made_processor
    if families is not None:
        require_family(model if model is not None else load_config(name_or_path), families, method)
    if model is None:
        model = load_model(name_or_path, dtype=torch.bfloat16 if bf16 else None)
    if processor is None:
        processor = load_processor(name_or_path)
    return model, processor


def stage_info(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``latent_stage.json`` of a stage output ({} when absent)."""
    path = Path(directory) / STAGE_INFO_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageError(f"{path} is not valid JSON ({err}): the stage output is corrupted") from None


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


class LatentModel(nn.Module):
    """Base of a method's trainable model: a (PEFT-wrapped) ``backbone`` plus the method's extra modules.

    ``forward(**batch)`` returns a dict with ``loss`` (next-token prediction) and optionally ``aux_losses``
    (named scalars, weighed by :meth:`LatentTrainingArguments.loss_weight`). ``config`` is the backbone's (the
    DeepSpeed integration sizes its buckets from it).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def config(self):
        return self.backbone.config

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """Activation checkpointing in the backbone's layers (what the Trainer calls with
        ``activation_checkpointing=True``)."""
        self.backbone.activation_checkpointing_enable(**kwargs)

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(getattr(self.backbone, "is_activation_checkpointing", False))

    def forward(self, **batch: Any) -> dict[str, Any]:
        out = self.backbone(**batch)
        return {"loss": out.loss, "logits": out.logits}


class LatentTrainer(Trainer):
    """``transformers.Trainer`` with named auxiliary losses, per-step schedules, and saving of extra modules.

    Args:
        step_schedules: functions ``fn(global_step)`` run before every optimizer step (see :func:`schedule_callback`).
        stage_info: extra facts written to ``latent_stage.json`` with every save (e.g. added tokens, stage number).
        Everything else as ``transformers.Trainer``.
    """

    # compute_loss returns per-batch means (the model is not handed num_items_in_batch): HF divides them by the
    # gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        step_schedules: list[Callable[[int], Any]] | None = None,
        stage_info: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks += [schedule_callback(fn) for fn in step_schedules or ()]
        super().__init__(*args, callbacks=callbacks, **kwargs)
        if getattr(self.args, "gradient_checkpointing", False):
            # Training with activation checkpointing never uses the KV cache: say so up front instead of letting
            # every forward warn and switch it off.
            config = getattr(self.model, "config", None)
            for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())}.values():
                if cfg is not None and hasattr(cfg, "use_cache"):
                    cfg.use_cache = False
        self.stage_info = dict(stage_info or {})
        self._master_weights()
        self._save_tables: bool | None = None
        self._loss_terms: dict[str, list[float]] = defaultdict(list)

    def _master_weights(self) -> None:
        """Mixed precision the way HF Trainer's AMP and DeepSpeed do it: the weights that train are fp32 (the master
        copy the optimizer updates; a bf16 weight loses most updates below its 8-bit mantissa, e.g. lr 5e-6 steps on
        weights of 1e-2), compute runs in bf16 / fp16 under the Trainer's autocast. A base loaded in bf16
        (``load_base(bf16=True)``: half the memory of the frozen parts) gets its trained weights upcast here, before
        the optimizer is built. Under DeepSpeed its engine keeps the fp32 master copies itself."""
        half = (torch.bfloat16, torch.float16)
        trained = [p for p in self.model.parameters() if p.requires_grad and p.dtype in half]
        if not trained or self.is_deepspeed_enabled:
            return
        if not (self.args.bf16 or self.args.fp16):
            logger.warning(
                "%d trainable tensors are %s but mixed precision is off: training them in half precision loses small "
                "updates; pass --bf16 (fp32 master weights, bf16 compute) or load the model in float32",
                len(trained), trained[0].dtype,
            )  # fmt: skip
            return
        with torch.no_grad():
            for param in trained:
                param.data = param.data.float()
        logger.info("mixed precision: %d trained tensors upcast to fp32 master weights", len(trained))

    # -- loss -----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
        if loss is None:
            raise ValueError("the model returned no loss: the batch needs `labels` (see the data collator)")
        aux = outputs.get("aux_losses") if isinstance(outputs, Mapping) else None
        terms = {"ntp": loss}
        total = loss
        for name, value in (aux or {}).items():
            total = total + self.args.loss_weight(name) * value
            terms[name] = value
        if model.training:
            for name, value in terms.items():
                self._loss_terms[name].append(float(value.detach()))
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._loss_terms and "loss" in logs:  # a training log: add each term's mean since the last log
            for name, values in self._loss_terms.items():
                logs[f"{name}_loss"] = sum(values) / len(values)
            self._loss_terms.clear()
        super().log(logs, start_time)

    def train_and_save(self, output_dir: str | os.PathLike, summary_name: str, **facts: Any) -> dict[str, Any]:
        """Train, save the stage to ``output_dir`` and write a JSON summary ``summary_name`` next to it (steps,
        losses, learning rate, batch size, seconds, plus ``facts``); returns the summary.

        A run killed part-way resumes from the last complete ``checkpoint-N`` in ``args.output_dir`` (weights,
        optimizer, scheduler, data order: the Trainer's own resume) when it was written by a run with the same
        settings (``latent_stage.json``'s ``run``: the stage facts and the optimisation arguments); a checkpoint of a
        run with other settings is an error, never silently continued. Once the stage is saved, the checkpoints are
        deleted unless ``args.keep_checkpoints``."""
        start = time.perf_counter()
        self.stage_info["run"] = self._run_settings()
        last = self._checkpoint_to_resume()
        if last is not None:
            logger.info("resuming from %s", last)
        result = self.train(resume_from_checkpoint=last)
        self.save_model(str(output_dir))
        losses = [h["loss"] for h in self.state.log_history if "loss" in h]
        summary = {
            **self.stage_info,
            **facts,
            "output_dir": str(output_dir),
            "steps": self.state.global_step,
            "learning_rate": self.args.learning_rate,
            "per_device_train_batch_size": self.args.per_device_train_batch_size,
            "train_loss": result.training_loss,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - start,
        }
        if last is not None:
            summary["resumed_from"] = last
        if self.args.should_save:
            Path(output_dir, summary_name).write_text(json.dumps(summary, indent=2) + "\n")
            if not self.args.keep_checkpoints:
                for checkpoint in Path(self.args.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                    shutil.rmtree(checkpoint, ignore_errors=True)
        return summary

    _RUN_ARGS = (
        "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
        "num_train_epochs", "seed", "weight_decay", "lr_scheduler_type", "warmup_steps", "max_grad_norm",
    )  # fmt: skip

    def _run_settings(self) -> dict[str, Any]:
        """What must be equal for a checkpoint to be resumed: the stage facts and the optimisation arguments."""
        facts = {k: v for k, v in self.stage_info.items() if k != "run"}
        return json.loads(
            json.dumps({**facts, **{k: getattr(self.args, k, None) for k in self._RUN_ARGS}}, default=str)
        )

    def _checkpoint_to_resume(self) -> str | None:
        """The newest complete checkpoint of ``args.output_dir`` (``trainer_state.json`` and the weights written),
        ``None`` when there is none.

        Raises:
            StageError: it was written by a run with other settings (the message names them and what to do).
        """
        root = Path(self.args.output_dir)
        if not root.is_dir():
            return None
        complete = []
        for path in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            step = path.name.rsplit("-", 1)[-1]
            weights = any((path / name).is_file() for name in _WEIGHT_FILES)
            if step.isdigit() and (path / "trainer_state.json").is_file() and weights:
                complete.append((int(step), path))
        if not complete:
            return None
        last = max(complete)[1]
        saved = stage_info(last).get("run")
        now = self.stage_info["run"]
        if saved != now:
            changed = sorted(k for k in {*(saved or {}), *now} if (saved or {}).get(k) != now.get(k))
            raise StageError(
                f"{last} was written by a run with other settings ({', '.join(changed) or 'unknown'}): resuming it "
                f"would mix two runs. Delete the {PREFIX_CHECKPOINT_DIR}-* folders in {root} to start over, or rerun "
                "with the settings it was made with"
            )
        return str(last)

    # -- saving ---------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_deepspeed_enabled and self.deepspeed.zero_optimization_stage() == 3:
            # Gather only the trainable parameters (adapter, rows, heads): not the frozen base model.
            state_dict = self.deepspeed._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        peft_model, prefix = _peft_model(model)
        if peft_model is None:
            if isinstance(model, PreTrainedModel) and all(p.requires_grad for p in model.parameters()):
                self._save_standalone(model, output_dir, state_dict)
            else:
                self._save_full_weights(model, output_dir, state_dict)
            return
        # Values: the gathered state dict under ZeRO-3, else the live parameters.
        values = state_dict if state_dict else dict(model.state_dict())
        adapter_state = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
        peft_model.save_pretrained(
            output_dir,
            state_dict=adapter_state,
            safe_serialization=True,
            save_embedding_layers=self._vocabulary_tables(peft_model),
        )
        extras = extra_state_dict(model, values)
        if extras:
            save_file(extras, os.path.join(output_dir, EXTRA_MODULES_NAME), metadata={"format": "pt"})
        info = {
            **self.stage_info,
            "base_model": getattr(peft_model.peft_config[peft_model.active_adapter], "base_model_name_or_path", None),
            "embedding_rows": int(num_rows(peft_model.get_input_embeddings())),
            "extra_keys": sorted(extras),
            "previous_stages": _applied_stages(model),
            "trainable_rows": _rows_record(peft_model),
        }
        self._write_stage_files(output_dir, info)

    def _vocabulary_tables(self, peft_model: Any) -> bool:
        """Whether the adapter carries the embedding / head tables (decided once, :func:`_vocabulary_changed`)."""
        if self._save_tables is None:
            self._save_tables = _vocabulary_changed(peft_model, self.stage_info.get("tokens") or ())
        return self._save_tables

    def _save_standalone(self, model: PreTrainedModel, output_dir: str, state_dict: dict | None) -> None:
        """Every weight trained (``make-base``): a standard ``save_pretrained`` checkpoint (safetensors) that
        ``latent_core.load_model`` / ``from_pretrained`` load, plus the processor and ``latent_stage.json``."""
        model.save_pretrained(output_dir, state_dict=state_dict or None, safe_serialization=True)
        info = {**self.stage_info, "full_model": True, "embedding_rows": int(num_rows(model.get_input_embeddings()))}
        self._write_stage_files(output_dir, info)

    def _save_full_weights(self, model: nn.Module, output_dir: str, state_dict: dict | None) -> None:
        """A full-weight stage: the trainable weights of the transformers model in ``stage_weights.safetensors``
        (names relative to it; the frozen ones stay with the base, named in ``latent_stage.json``), the trainer's
        other trainable parameters in ``extra_modules.safetensors``."""
        base, prefix = _transformers_model(model)
        if base is None:
            raise ValueError(
                "LatentTrainer saves PEFT adapters or transformers models: the model to train holds neither (wrap a "
                "transformers model in latent_core.LatentModel, or prepare it with latent_core.prepare_lora_model)"
            )
        values = state_dict if state_dict else dict(model.named_parameters())
        trained = [n for n, p in base.named_parameters() if p.requires_grad]  # tied weights: one name
        weights = {n: values[prefix + n].detach().to("cpu").contiguous() for n in trained}
        save_file(weights, os.path.join(output_dir, STAGE_WEIGHTS_NAME), metadata={"format": "pt"})
        extras = extra_state_dict(model, values, exclude_prefix=prefix)
        if extras:
            save_file(extras, os.path.join(output_dir, EXTRA_MODULES_NAME), metadata={"format": "pt"})
        info = {
            **self.stage_info,
            "kind": "full",
            "base_model": getattr(base.config, "_name_or_path", None) or getattr(base, "name_or_path", None),
            "trained_weights": len(weights),
            "frozen_weights": sum(1 for _, p in base.named_parameters() if not p.requires_grad),
            "embedding_rows": int(num_rows(base.get_input_embeddings())),
            "extra_keys": sorted(extras),
            "previous_stages": _applied_stages(model),
        }
        self._write_stage_files(output_dir, info)

    def _write_stage_files(self, output_dir: str, info: dict[str, Any]) -> None:
        Path(output_dir, STAGE_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.is_deepspeed_enabled:  # DeepSpeed restores the whole engine from its own checkpoint
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from peft import set_peft_model_state_dict

        model = model if model is not None else self.model
        peft_model, _ = _peft_model(model)
        weights = Path(resume_from_checkpoint) / STAGE_WEIGHTS_NAME
        if peft_model is None and weights.is_file():  # a full-weight stage's checkpoint
            base, _ = _transformers_model(model)
            _copy_into(base, weights)
            load_extra_modules(model, resume_from_checkpoint)
            return None
        if peft_model is None and isinstance(model, PreTrainedModel):  # a standalone checkpoint
            # Through from_pretrained: it maps the saved keys (checkpoint layout) back to the live module names. The
            # Trainer's own load_state_dict(strict=False) silently skips every renamed key (Qwen2.5-VL's and
            # mllama's `model.language_model.*` are saved as `model.*` in transformers 5) and resumes from scratch.
            dtype = next(model.parameters()).dtype
            loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype)
            try:
                model.load_state_dict(loaded.state_dict(), strict=True)
            except RuntimeError as err:
                raise StageError(f"checkpoint {resume_from_checkpoint} does not fit the model: {err}") from None
            return None
        adapter = Path(resume_from_checkpoint) / "adapter_model.safetensors"
        if peft_model is None or not adapter.is_file():
            raise StageError(f"checkpoint {resume_from_checkpoint} has no PEFT adapter to resume from")
        set_peft_model_state_dict(peft_model, load_tensors(adapter), adapter_name=peft_model.active_adapter)
        load_extra_modules(model, resume_from_checkpoint)
