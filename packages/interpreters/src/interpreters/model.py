"""The interpreter: a causal LM reading one hidden state through a placeholder token (METHODS.md §1).

Prompt (paper 000 section 3.3): ``According to question: {question}, can you explain the thinking progress
<THOUGHT>?``, rendered as the user turn of the LM's chat template; the target (the stage's CoT text) is the assistant
turn. The placeholder (``<THOUGHT>`` above) is one token: by default a reserved (or unused special) token the
tokenizer already has (:func:`interpreters.config.choose_placeholder`), else an added special token whose rows the
adapter saves as rows. Its input embedding is **replaced after
the embedding layer**:

    e_t = projector(H)   at the placeholder position t,   e_i = Embed(x_i) elsewhere,

by a forward hook on the LM's input embeddings, registered only for the duration of one call (no class patching; the
model is left as it was). ``projector`` is the identity when the Heima hidden size equals the LM's, else a learned
``Linear`` (or a two-layer MLP) d_heima -> d_lm, a registered submodule: the trainer saves it with the adapter
(``extra_modules.safetensors``, keys ``projector.*``).

Controls (the information gap, METHODS.md §1): :func:`apply_condition` feeds ``"zero"`` (a zero vector, which the
projector maps to its bias) or ``"shuffled"`` (another sample's state: a seeded random permutation of the samples,
rolled by one so that no sample keeps its own state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from latent_core.trainer import LatentModel
from torch import nn

from interpreters.config import CONDITIONS, DEFAULT_PLACEHOLDER, DEFAULT_TEMPLATE, PROJECTORS, SUPPORTED_FAMILIES

__all__ = ["InterpreterModel", "apply_condition", "build_interpreter", "build_projector", "load_interpreter"]

PROJECTOR_PREFIX = "projector."
INTERPRETER_INFO_KEY = "interpreter"


def build_projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    """The projector d_in -> d_out: ``identity`` (sizes must match), ``linear``, ``mlp`` (Linear-GELU-Linear), or
    ``auto`` (identity when ``d_in == d_out``, else linear)."""
    if kind not in PROJECTORS:
        raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, got {kind!r}")
    if kind == "auto":
        kind = "identity" if d_in == d_out else "linear"
    if kind == "identity":
        if d_in != d_out:
            raise ValueError(
                f"an identity projector needs equal sizes, but the hidden states have {d_in} and the interpreter "
                f"{d_out}: use projector='linear' or 'mlp'"
            )
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


def _projector_kind(projector: nn.Module) -> str:
    if isinstance(projector, nn.Identity):
        return "identity"
    return "linear" if isinstance(projector, nn.Linear) else "mlp"


class InterpreterModel(LatentModel):
    """A (PEFT-wrapped) causal LM ``backbone`` plus the ``projector``; see the module docstring.

    Args:
        backbone: the LM with the placeholder token added (usually LoRA-wrapped).
        placeholder_id: the placeholder token's id.
        hidden_size: the size of the hidden states fed in (Heima's ``d``).
        projector: a kind (:data:`interpreters.config.PROJECTORS`) or a ready module.
        template, placeholder: the explanatory prompt it is trained and decoded with (kept for decoding).
    """

    def __init__(
        self,
        backbone: nn.Module,
        placeholder_id: int,
        hidden_size: int,
        projector: str | nn.Module = "auto",
        *,
        template: str = DEFAULT_TEMPLATE,
        placeholder: str = DEFAULT_PLACEHOLDER,
    ):
        super().__init__(backbone)
        self.template = template
        self.placeholder = placeholder
        self.placeholder_id = int(placeholder_id)
        self.hidden_size = int(hidden_size)
        d_lm = backbone.get_input_embeddings().weight.shape[1]
        self.projector = build_projector(projector, hidden_size, d_lm) if isinstance(projector, str) else projector

    @contextlib.contextmanager
    def inject(self, hidden: torch.Tensor) -> Iterator[dict[str, int]]:
        """Within the body, every embedding call whose ``input_ids`` hold the placeholder gets row ``b``'s
        placeholder embedding replaced by ``projector(hidden[b])``. Each row must hold exactly one placeholder (calls
        without any, e.g. cached decoding steps, pass unchanged). Yields a counter of replaced rows."""
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"hidden must be [batch, {self.hidden_size}], got {tuple(hidden.shape)}")
        count = {"rows": 0}

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            ids = args[0]
            mask = ids == self.placeholder_id
            if not bool(mask.any()):
                return None
            per_row = mask.sum(1)
            if ids.shape[0] != hidden.shape[0] or not bool((per_row == 1).all()):
                raise ValueError(
                    f"every prompt must contain the placeholder exactly once and there must be one hidden state per "
                    f"row: got placeholder counts {per_row.tolist()} for {hidden.shape[0]} hidden states"
                )
            projected = self.projector(hidden.to(device=output.device, dtype=self._projector_dtype(output)))
            out = output.clone()
            out[mask] = projected.to(output.dtype)  # one placeholder per row: mask rows are in batch order
            count["rows"] += int(mask.sum())
            return out

        handle = self.backbone.get_input_embeddings().register_forward_hook(hook)
        try:
            yield count
        finally:
            handle.remove()

    def _projector_dtype(self, output: torch.Tensor) -> torch.dtype:
        param = next(self.projector.parameters(), None)
        return param.dtype if param is not None else output.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Teacher-forced forward with the hidden states injected: ``{"loss", "logits"}`` (loss on ``labels``)."""
        with self.inject(hidden) as count:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if count["rows"] != input_ids.shape[0]:
            raise RuntimeError("the placeholder embedding was not replaced: pass input_ids (not inputs_embeds)")
        return {"loss": out.loss, "logits": out.logits}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``backbone.generate`` with the hidden states injected at the prompt's placeholder (left-padded batch)."""
        with self.inject(hidden) as count:
            out = self.backbone.generate(input_ids=input_ids, **kwargs)
        if count["rows"] != input_ids.shape[0]:
            raise RuntimeError("the placeholder embedding was not replaced during generate")
        return out

    def info(self) -> dict[str, Any]:
        """What :func:`load_interpreter` needs to rebuild this wrapper (saved in ``latent_stage.json``)."""
        return {
            "placeholder_id": self.placeholder_id,
            "hidden_size": self.hidden_size,
            "projector": _projector_kind(self.projector),
            "template": self.template,
            "placeholder": self.placeholder,
        }


def build_interpreter(
    model: nn.Module,
    tokenizer: Any,
    hidden_size: int,
    *,
    placeholder: str = DEFAULT_PLACEHOLDER,
    template: str = DEFAULT_TEMPLATE,
    projector: str = "auto",
    lora: bool = True,
    **lora_kwargs: Any,
) -> InterpreterModel:
    """Add ``placeholder`` to ``model``/``tokenizer``, wrap ``model`` with LoRA (``latent_core.prepare_lora_model``:
    ``r``, ``alpha``, ``dropout``...; Table A3: 16/32) unless ``lora=False``, and attach the projector.

    A placeholder new to the vocabulary gets its rows through the trainable-rows route (PEFT's
    ``trainable_token_indices``, or ``TrainableRows`` under ZeRO-3 without CUDA): its input row is always replaced by
    the hidden state, but its ``lm_head`` row is part of the model, and this way the adapter saves that one row of each
    table instead of the whole vocabulary tables (~239 MB on SmolLM2-135M, ~2 GB on an 8B model)."""
    from latent_core.lora import prepare_lora_model
    from latent_core.tokens import add_special_tokens

    new = placeholder not in tokenizer.get_vocab()
    (placeholder_id,) = add_special_tokens(model, tokenizer, [placeholder])
    if lora:
        backbone = prepare_lora_model(model, new_token_ids=[placeholder_id] if new else (), **lora_kwargs)
    else:
        backbone = model
    return InterpreterModel(
        backbone, placeholder_id, hidden_size, projector, template=template, placeholder=placeholder
    )


def load_interpreter(
    directory: str | Path,
    base_model: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[InterpreterModel, Any]:
    """Load a trained interpreter (:func:`interpreters.trainer.train_interpreter`'s stage directory):
    ``(model, tokenizer)``, eval mode; the base LM, the placeholder, the adapter and the projector."""
    from latent_core.hub import load_tensors
    from latent_core.inference import load_trained
    from latent_core.trainer import EXTRA_MODULES_NAME, StageError, stage_info

    directory = Path(directory)
    info = stage_info(directory).get(INTERPRETER_INFO_KEY)
    if info is None:
        raise StageError(f"{directory} is not a trained interpreter (no 'interpreter' entry in latent_stage.json)")
    backbone, tokenizer = load_trained(
        directory, base_model, dtype=dtype, device=device, skip_extra_prefixes=(PROJECTOR_PREFIX,),
        families=SUPPORTED_FAMILIES, method="interpreters",
    )  # fmt: skip
    model = InterpreterModel(
        backbone,
        info["placeholder_id"],
        info["hidden_size"],
        info["projector"],
        template=info.get("template", DEFAULT_TEMPLATE),
        placeholder=info.get("placeholder", DEFAULT_PLACEHOLDER),
    )
    extras = directory / EXTRA_MODULES_NAME
    saved = load_tensors(extras) if extras.is_file() else {}
    state = {k[len(PROJECTOR_PREFIX) :]: v for k, v in saved.items() if k.startswith(PROJECTOR_PREFIX)}
    if list(model.projector.parameters()) and not state:
        raise StageError(f"{directory}: the {info['projector']} projector's weights are missing from {extras}")
    if state:
        model.projector.load_state_dict(state)
    device = next(backbone.parameters()).device
    return model.to(device).eval(), tokenizer


def apply_condition(hidden: torch.Tensor, condition: str, seed: int = 0) -> torch.Tensor:
    """The states fed under ``condition`` (rows = samples): ``"real"`` as is, ``"zero"`` zeros, ``"shuffled"`` row
    ``i`` gets row ``perm[(j + 1) % n]`` where ``perm`` is a ``torch.randperm(n)`` seeded with ``seed`` and
    ``perm[j] == i``: a fixed random derangement (no sample keeps its own state when ``n > 1``)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    if condition == "real":
        return hidden
    if condition == "zero":
        return torch.zeros_like(hidden)
    n = hidden.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    source = torch.empty(n, dtype=torch.long)
    source[perm] = perm.roll(-1)
    return hidden[source]
