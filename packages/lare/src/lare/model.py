"""The LaRe model (METHODS.md section 3): a llava VLM (CLIP ViT-L/14 at 224 px -> 16x16 = 256 visual tokens, an MLP
projector, a Qwen2.5 LLM), the extractor, and the ``<bot>`` / ``<eot>`` tokens.

- :func:`compose` builds it from the two pretrained parts as the LLaVA-1.5 recipe starts: the CLIP vision tower and
  the LLM by alias, Hub id or path with their real weights, a fresh projector, LLaVA-1.5's feature layer (-2, patch
  tokens only), the LLM's tokenizer with ``<image>``, ``<bot>`` and ``<eot>`` added and a ChatML template that
  places the image first. :func:`from_llava` starts from any existing llava checkpoint instead.
- :class:`LareModel` holds the transformers model (``vlm``, a plain ``LlavaForConditionalGeneration``), the
  extractor and the :class:`~lare.config.LareConfig`. A checkpoint directory is the model's and the processor's
  ``save_pretrained`` plus ``lare_extractor.safetensors`` and ``lare_config.json``; :func:`load_lare` reads it back.
- :class:`RefocusStep` is one run's step function for :func:`latent_core.generate_with_latents` /
  :func:`latent_core.forward_with_latents`: the iteration t of Section 3.1 (the query from every layer's state at
  the current position, the saliency map and window from that position's attention over the image tokens, V_local
  from the projector-output features, the extractor -> z_t).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lare.config import CONFIG_NAME, LareConfig
from lare.extractor import EXTRACTOR_WEIGHTS, Extractor
from lare.refocus import grid_side, refocus

__all__ = ["CHAT_TEMPLATE", "LareModel", "RefocusStep", "compose", "from_llava", "load_lare"]

IMAGE_TOKEN = "<image>"

# ChatML (Qwen2.5's turn format) with the image first in the user turn, as LLaVA with a Qwen2 LLM expects; Qwen's own
# template writes string contents only. Newlines as {{ '\n' }} because transformers renders with trim_blocks.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system{{ '\\n' }}You are a helpful assistant.<|im_end|>"
    "{{ '\\n' }}{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


class LareModel(nn.Module):
    """The llava ``vlm``, the ``extractor`` and the ``config``; ``bot_id`` / ``eot_id`` are the delimiter ids."""

    def __init__(self, vlm: nn.Module, extractor: Extractor, config: LareConfig, bot_id: int, eot_id: int) -> None:
        super().__init__()
        self.vlm = vlm
        self.extractor = extractor
        self.config = config
        self.bot_id, self.eot_id = bot_id, eot_id

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vlm.parameters()).dtype

    def grid(self) -> int:
        """The side of the image-token grid (16 for CLIP ViT-L/14 at 224 px); refuses a llava whose image tokens
        are not a square grid of patches (CLIP's class token kept: ``vision_feature_select_strategy="full"``)."""
        config = self.vlm.config
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(
                f"LaRe's window needs the patch tokens alone; this llava's vision_feature_select_strategy is "
                f"{strategy!r} (CLIP's class token kept): use a checkpoint with 'default'"
            )
        vision = config.vision_config
        return grid_side((vision.image_size // vision.patch_size) ** 2)

    def step(self) -> RefocusStep:
        """A fresh step function for one latent run (it keeps that run's latent-state sequence)."""
        return RefocusStep(self)

    def save_pretrained(self, directory: str | Path, processor: Any = None) -> Path:
        """The checkpoint directory: the model's (and ``processor``'s) ``save_pretrained``, the extractor in
        safetensors and ``lare_config.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vlm.save_pretrained(directory)
        if processor is not None:
            processor.save_pretrained(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.extractor.state_dict().items()}
        save_file(state, str(directory / EXTRACTOR_WEIGHTS))
        self.config.save(directory)
        return directory


class RefocusStep:
    """Latent refocusing as a ``step_fn`` (Section 3.1; see the module docstring). Needs the loop's
    ``step_attention`` (the image-token mask), ``step_image_features=True`` and, with ``query="layers"``,
    ``step_hidden_states=True`` (:meth:`loop_kwargs`). Keeps this run's latent-state sequence (``states``) and the
    window each step chose (``windows``: ``[B, w*w]`` token indices per step); both start afresh when a run's first
    step arrives, so one object may serve several runs (the last run's are kept). The saliency map stays in float32
    (the recorder's precision) whatever the model's dtype, so a bf16 model picks the same window."""

    def __init__(self, model: LareModel) -> None:
        self.model = model
        self.window = model.config.window_for(model.grid())
        self.states: list[Tensor] = []
        self.windows: list[Tensor] = []

    def loop_kwargs(self, input_ids: Tensor) -> dict[str, Any]:
        """What :func:`latent_core.generate_with_latents` / ``forward_with_latents`` must hand this step function:
        ``<bot>`` as the start and ``<eot>`` as the end id, every layer's hidden state, the attention over the image
        tokens of ``input_ids`` (every layer) and the projector-output image features."""
        from latent_core.families import image_token_mask

        model = self.model
        return dict(
            start_ids=[model.bot_id],
            end_ids=[model.eot_id],
            step_hidden_states=model.config.query == "layers",
            step_attention=image_token_mask(model.vlm, input_ids),
            step_image_features=True,
        )

    def __call__(self, hidden: Tensor, state: Any) -> Tensor:
        if state.step == 1:  # a new run: the previous run's sequence (and its autograd graph) is dropped
            self.states, self.windows = [], []
        extractor = self.model.extractor
        dtype = next(extractor.parameters()).dtype
        hidden_states = None if state.hidden_states is None else [h.to(dtype) for h in state.hidden_states]
        self.states.append(extractor.query(hidden_states, hidden.to(dtype)))
        if state.attention is None or state.image_features is None:
            raise ValueError("RefocusStep needs the loop's step_attention and step_image_features (loop_kwargs)")
        attention = torch.stack(state.attention).float()
        features = torch.stack(state.image_features).to(dtype)
        v_local, indices = refocus(attention, features, self.window, self.model.config.stride)
        self.windows.append(indices)
        return extractor(torch.stack(self.states, 1), v_local)


def _add_lare_tokens(vlm: nn.Module, processor: Any, config: LareConfig) -> tuple[int, int]:
    from latent_core.tokens import add_special_tokens

    bot, eot = add_special_tokens(vlm, processor, [config.bot_token, config.eot_token])
    return bot, eot


def compose(
    vision: str, llm: str, config: LareConfig | None = None, *, feature_layer: int = -2, seed: int = 0
) -> tuple[LareModel, Any]:
    """``(LareModel, processor)`` composed from a CLIP vision tower and a causal LLM (aliases ``clip-vit-l-14``,
    ``qwen2.5-0.5b|1.5b|7b``, Hub ids or paths), with their pretrained weights, a fresh two-layer GELU projector
    (LLaVA-1.5), a fresh extractor, and ``<image>`` / ``<bot>`` / ``<eot>`` added to the LLM's tokenizer.

    ``vision`` may be a full CLIP checkpoint (its vision half is used) or a ``CLIPVisionModel``; its image processor
    is loaded from the same place. ``feature_layer``: the vision layer whose patch features feed the projector
    (LLaVA-1.5: -2).
    """
    from latent_core.hub import load_model, load_pretrained, load_processor
    from latent_core.tokens import add_special_tokens
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    config = config or LareConfig()
    tower = load_pretrained(CLIPVisionModel.from_pretrained, vision)
    image_processor = load_pretrained(CLIPImageProcessor.from_pretrained, vision)
    lm = load_model(llm, family="causal_lm")
    tokenizer = load_processor(llm)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE  # prompts render through the tokenizer (latent_core.prompts)
    text = lm.config
    vision_config = tower.config
    grid = grid_side((vision_config.image_size // vision_config.patch_size) ** 2)
    config.window_for(grid)
    llava_config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text.to_dict(),
        image_token_index=0,  # set below, once <image> has its id
        vision_feature_select_strategy="default",
        vision_feature_layer=feature_layer,
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )
    # Built on the meta device, then the pretrained parts themselves are put in place (no random initialisation of a
    # 7B LLM, no second copy of its weights); only the projector is created and initialised here.
    with torch.device("meta"):
        vlm = LlavaForConditionalGeneration(llava_config)
    vlm.model.vision_tower = tower.to(lm.dtype)
    vlm.model.language_model = lm.model
    vlm.lm_head = lm.lm_head
    vlm.config.vision_config, vlm.config.text_config = tower.config, lm.config  # one config object per part
    projector = vlm.model.multi_modal_projector.to_empty(device=lm.device)
    torch.manual_seed(seed)
    std = llava_config.get_text_config().initializer_range
    for layer in (projector.linear_1, projector.linear_2):  # LLaVA-1.5's two-layer GELU MLP
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    projector.to(lm.dtype)
    leftover = [name for name, t in [*vlm.named_parameters(), *vlm.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"lare init left tensors uninitialised: {leftover[:5]}")
    (image_id,) = add_special_tokens(vlm, tokenizer, [IMAGE_TOKEN])
    vlm.config.image_token_index = image_id
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    vlm.generation_config.eos_token_id = lm.generation_config.eos_token_id  # Qwen2.5-Instruct: <|im_end|> and more
    vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    bot, eot = _add_lare_tokens(vlm, processor, config)
    extractor = Extractor.for_model(vlm, config).to(lm.dtype)
    model = LareModel(vlm, extractor, config, bot, eot).eval()
    config.window_for(model.grid())
    return model, processor


def from_llava(path: str, config: LareConfig | None = None, seed: int = 0) -> tuple[LareModel, Any]:
    """``(LareModel, processor)`` from an existing llava checkpoint (alias, Hub id or path): ``<bot>`` / ``<eot>``
    added and a fresh extractor."""
    from latent_core.hub import load_model, load_processor

    config = config or LareConfig()
    vlm = load_model(path, family="llava")
    processor = load_processor(path)
    torch.manual_seed(seed)
    bot, eot = _add_lare_tokens(vlm, processor, config)
    model = LareModel(vlm, Extractor.for_model(vlm, config).to(vlm.dtype), config, bot, eot).eval()
    config.window_for(model.grid())
    return model, processor


def load_lare(
    path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **overrides: Any
) -> tuple[LareModel, Any]:
    """``(LareModel, processor)`` from a checkpoint directory :meth:`LareModel.save_pretrained` wrote, eval mode,
    on ``device`` (default: CUDA when available). ``overrides`` change config fields for this run (e.g.
    ``halt="cos", threshold=0.02``; ``None`` values are ignored).

    The small files are checked before the model's weights load: ``lare_config.json``, the extractor's weights
    (readable safetensors whose names and shapes fit the config and the model's width), the processor and the
    ``<bot>`` / ``<eot>`` tokens.

    Raises:
        FileNotFoundError: ``path`` is not a LaRe checkpoint (no ``lare_config.json``).
        latent_core.FamilyError: the checkpoint is not a llava model.
        latent_core.CheckpointError: a file of the checkpoint is missing, corrupted or does not fit (named).
    """
    from latent_core.families import require_family
    from latent_core.hub import CheckpointError, load_config, load_model, load_processor, load_tensors

    path = Path(path)
    config = LareConfig.load(path).replace(**overrides)
    llava_config = load_config(str(path))
    require_family(llava_config, ("llava",), "LaRe")
    weights = path / EXTRACTOR_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found: the checkpoint has no extractor (`lare init` writes one)")
    state = load_tensors(weights)
    with torch.device("meta"):  # the expected names and shapes, without allocating
        expected = Extractor.for_model(llava_config, config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in state and
             state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or wrong:
        found = "; ".join(
            f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        )
        raise CheckpointError(f"{weights} does not fit the extractor of {path / CONFIG_NAME} ({found})")
    try:
        processor = load_processor(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: the processor (tokenizer, image processor) cannot be loaded: {err}") from None
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (config.bot_token, config.eot_token)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise CheckpointError(f"{path}: the tokenizer lacks {config.bot_token} / {config.eot_token}")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        vlm = load_model(str(path), family="llava", **kwargs)
    except OSError as err:
        raise CheckpointError(f"{path}: the llava model's weights cannot be loaded: {err}") from None
    extractor = Extractor.for_model(vlm, config)
    extractor.load_state_dict(state)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LareModel(vlm, extractor.to(vlm.dtype), config, ids[0], ids[1]).to(device).eval()
    model.grid()
    return model, processor
