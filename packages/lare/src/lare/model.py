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
import torch.nn.functional as F
from torch import Tensor, nn

from lare.config import CONFIG_NAME, LareConfig
from lare.extractor import EXTRACTOR_WEIGHTS, Extractor
from lare.refocus import grid_side, refocus

__all__ = [
    "CHAT_TEMPLATE",
    "STAGE_GROUPS",
    "LareForTraining",
    "LareModel",
    "RefocusStep",
    "add_image_token",
    "compose",
    "compose_config",
    "from_llava",
    "load_lare",
    "wrap_llava",
]

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
    ``step_hidden_states=True`` (:meth:`loop_kwargs`). Keeps this run's latent-state sequence (``states``), the
    window each step chose (``windows``: ``[B, w*w]`` token indices per step) and its V_local (``v_locals``, the
    visual anchors of L_align); all start afresh when a run's first
    step arrives, so one object may serve several runs (the last run's are kept). The saliency map stays in float32
    (the recorder's precision) whatever the model's dtype, so a bf16 model picks the same window."""

    def __init__(self, model: LareModel) -> None:
        self.model = model
        self.window = model.config.window_for(model.grid())
        self.states: list[Tensor] = []
        self.windows: list[Tensor] = []
        self.v_locals: list[Tensor] = []

    def loop_kwargs(self, input_ids: Tensor) -> dict[str, Any]:
        """What :func:`latent_core.generate_with_latents` / ``forward_with_latents`` must hand this step function:
        ``<bot>`` as the start and ``<eot>`` as the end id, every layer's hidden state, the attention over the image
        tokens of ``input_ids`` (every layer) and the projector-output image features."""
        from latent_core.families import image_token_mask

        model = self.model
        if not model.config.extractor:  # the hidden state alone: no attention, features or layers needed
            return dict(start_ids=[model.bot_id], end_ids=[model.eot_id])
        return dict(
            start_ids=[model.bot_id],
            end_ids=[model.eot_id],
            step_hidden_states=model.config.query == "layers",
            step_attention=image_token_mask(model.vlm, input_ids),
            step_image_features=True,
        )

    def __call__(self, hidden: Tensor, state: Any) -> Tensor:
        if state.step == 1:  # a new run: the previous run's sequence (and its autograd graph) is dropped
            self.states, self.windows, self.v_locals = [], [], []
        config = self.model.config
        if not config.extractor:  # Table 3's "w/o Extractor": the hidden state itself is the next input
            return hidden
        extractor = self.model.extractor
        dtype = next(extractor.parameters()).dtype
        hidden_states = None if state.hidden_states is None else [h.to(dtype) for h in state.hidden_states]
        self.states.append(extractor.query(hidden_states, hidden.to(dtype)))
        if state.attention is None or state.image_features is None:
            raise ValueError("RefocusStep needs the loop's step_attention and step_image_features (loop_kwargs)")
        attention = torch.stack(state.attention).float()
        features = torch.stack(state.image_features).to(dtype)
        if config.sliding_window:
            v_local, indices = refocus(attention, features, self.window, config.stride)
        else:  # Table 3's "w/o Sliding Window": every image token
            v_local = features
            indices = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
        self.windows.append(indices)
        self.v_locals.append(v_local)
        return extractor(torch.stack(self.states, 1), v_local)


def _add_lare_tokens(vlm: nn.Module, processor: Any, config: LareConfig) -> tuple[int, int]:
    from latent_core.tokens import add_special_tokens

    bot, eot = add_special_tokens(vlm, processor, [config.bot_token, config.eot_token])
    return bot, eot


def compose_config(vision_config: Any, text_config: Any, *, feature_layer: int = -2) -> Any:
    """The ``LlavaConfig`` :func:`compose` builds (LLaVA-1.5 recipe): ``vision_config`` a CLIP vision config (or a full
    CLIP config: its vision half), ``text_config`` the LLM's config; patch tokens only (``"default"``), features of
    ``feature_layer``, the two-layer GELU projector, one image token per patch (256 at 224 px), the LLM's tying. The
    ``<image>`` id is set by :func:`add_image_token`."""
    from transformers import LlavaConfig

    vision_config = getattr(vision_config, "vision_config", vision_config)
    grid = grid_side((vision_config.image_size // vision_config.patch_size) ** 2)
    return LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=0,  # set by add_image_token, once <image> has its id
        vision_feature_select_strategy="default",
        vision_feature_layer=feature_layer,
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def add_image_token(vlm: nn.Module, tokenizer: Any) -> int:
    """Add LLaVA's ``<image>`` to a composed ``vlm`` and its tokenizer and point ``image_token_index`` at it."""
    from latent_core.tokens import add_special_tokens

    (image_id,) = add_special_tokens(vlm, tokenizer, [IMAGE_TOKEN])
    vlm.config.image_token_index = image_id
    return image_id


def wrap_llava(vlm: nn.Module, processor: Any, config: LareConfig) -> LareModel:
    """The :class:`LareModel` of a llava ``vlm``: ``<bot>`` / ``<eot>`` added (model and processor), a fresh extractor
    in the model's dtype, eval mode; the window checked against the image grid. :func:`compose`, :func:`from_llava`
    and ``apps/cli plan`` (on the meta device) all end here."""
    bot, eot = _add_lare_tokens(vlm, processor, config)
    extractor = Extractor.for_model(vlm, config).to(vlm.dtype)
    model = LareModel(vlm, extractor, config, bot, eot).eval()
    config.window_for(model.grid())
    return model


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
    from transformers import CLIPImageProcessor, CLIPVisionModel, LlavaForConditionalGeneration, LlavaProcessor

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
    vision_config = tower.config
    config.window_for(grid_side((vision_config.image_size // vision_config.patch_size) ** 2))
    llava_config = compose_config(vision_config, lm.config, feature_layer=feature_layer)
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
    add_image_token(vlm, tokenizer)
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
    return wrap_llava(vlm, processor, config), processor


def from_llava(path: str, config: LareConfig | None = None, seed: int = 0) -> tuple[LareModel, Any]:
    """``(LareModel, processor)`` from an existing llava checkpoint (alias, Hub id or path): ``<bot>`` / ``<eot>``
    added and a fresh extractor."""
    from latent_core.hub import load_model, load_processor

    config = config or LareConfig()
    vlm = load_model(path, family="llava")
    processor = load_processor(path)
    torch.manual_seed(seed)
    return wrap_llava(vlm, processor, config), processor


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
    if not (path / "config.json").is_file() and (path / "latent_stage.json").is_file():
        return _load_stage(path, device=device, dtype=dtype, **overrides)
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


def _load_stage(path: Path, **kwargs: Any) -> tuple[LareModel, Any]:
    """A ``lare train`` stage: its base checkpoint (``latent_stage.json``'s ``base_model``), the trained weights of
    the stages it builds on and its own (:func:`latent_core.load_stage`), its extractor and config."""
    from latent_core.hub import CheckpointError, load_processor, load_tensors
    from latent_core.trainer import load_stage, stage_info

    info = stage_info(path)
    if info.get("method") != "lare" or not info.get("base_model"):
        raise CheckpointError(f"{path} is neither a LaRe checkpoint nor a `lare train` stage (latent_stage.json)")
    model, _ = load_lare(info["base_model"], **kwargs)
    load_stage(model.vlm, path)
    config = LareConfig.load(path).replace(**{k: v for k, v in kwargs.items() if k not in ("device", "dtype")})
    weights = path / EXTRACTOR_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found: the stage saved no extractor")
    model.extractor.load_state_dict({k: v.to(model.dtype) for k, v in load_tensors(weights).items()})
    model.config = config
    return model.eval(), load_processor(str(path))


STAGE_GROUPS: dict[int, tuple[str, ...]] = {
    1: ("projector",),
    2: ("extractor", "reconstructor"),
    3: ("projector", "language_model", "extractor", "reconstructor"),
    4: ("projector", "language_model", "extractor", "reconstructor"),
}
"""What each of Appendix A's four stages trains: I the projector (NTP); II the extractor and the U-Net, vision and LLM
frozen (latent losses); III instruction tuning and IV reasoning fine-tuning, all but the vision tower."""


class LareForTraining(nn.Module):
    """LaRe's training forward (Section 3.2): L = L_ntp + l_align L_align + l_img L_img + l_text L_text, the terms
    returned by name (``aux_losses``: ``align_text``, ``align_visual``, ``img``, ``text``) for
    :class:`latent_core.LatentTrainer`, which weighs them with the config's loss weights.

    Sequence: ``[V, X_q, <bot>, z_1..z_T, <eot>, answer]`` through :func:`latent_core.forward_with_latents` with the
    :class:`RefocusStep` (gradients reach the extractor through every z_t). Stage 1 (projector alignment) runs
    ``[V, X_q, answer]`` without latents. The aux terms need their inputs (a term whose inputs are absent, or whose
    module is missing, or that is not in ``terms``, is left out):

    - ``align_text`` / ``align_visual`` (:func:`lare.losses.symmetric_alignment`): the latents vs the language
      model's final hidden states over the reasoning text alone (``reasoning_ids`` / ``reasoning_mask``, no gradient:
      a target, **choice**) and vs the visual anchors (the V_local of every iteration; none without the extractor,
      whose ablation keeps ``align_text`` only);
    - ``img`` (:func:`lare.losses.diffusion_loss`): the image crop under the **last** iteration's window (**choice**;
      the whole image without the extractor)
      from ``pixel_values`` (CLIP normalisation undone, [-1, 1]), resized to ``crop_size``, encoded by the frozen
      ``vae`` (latent mean x scaling factor), denoised by ``reconstructor`` conditioned on all T latents;
    - ``text``: the next-token loss of the first 32 reasoning tokens (``text_ids`` / ``text_labels``,
      :func:`lare.losses.text_prefix_targets`) after the same ``[.., <eot>]`` prefix, in a second latent run.
    """

    def __init__(
        self,
        lare: LareModel,
        reconstructor: nn.Module | None = None,
        vae: nn.Module | None = None,
        scheduler: Any = None,
        stage: int = 2,
        image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
        image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711),
        crop_size: int = 128,
        temperature: float = 0.07,
        terms: tuple[str, ...] = ("align", "img", "text"),
    ) -> None:
        super().__init__()
        self.lare = lare
        self.terms = set(terms)
        self.reconstructor = reconstructor
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.scheduler = scheduler
        self.crop_size, self.temperature = crop_size, temperature
        self.register_buffer("image_mean", torch.tensor(image_mean)[:, None, None], persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std)[:, None, None], persistent=False)
        self.set_stage(stage)

    @property
    def config(self):  # what the trainer and DeepSpeed read
        return self.lare.vlm.config

    def groups(self) -> dict[str, nn.Module]:
        """The parameter groups the stages switch: projector, language_model (with the LM head), vision, extractor,
        reconstructor."""
        vlm = self.lare.vlm
        groups = {
            "projector": vlm.model.multi_modal_projector,
            "language_model": nn.ModuleList([vlm.model.language_model, vlm.lm_head]),
            "vision": vlm.model.vision_tower,
            "extractor": self.lare.extractor,
        }
        if self.reconstructor is not None:
            groups["reconstructor"] = self.reconstructor
        return groups

    def set_stage(self, stage: int) -> dict[str, int]:
        """Train exactly the groups of :data:`STAGE_GROUPS` ``[stage]`` (everything else frozen, the VAE always);
        returns the trainable parameter count per group."""
        if stage not in STAGE_GROUPS:
            raise ValueError(f"LaRe has stages 1-4 (Appendix A), got {stage}")
        self.stage = stage
        self.requires_grad_(False)
        counts = {}
        for name, module in self.groups().items():
            on = name in STAGE_GROUPS[stage]
            module.requires_grad_(on)
            counts[name] = sum(p.numel() for p in module.parameters()) if on else 0
        return counts

    def _crops(self, pixel_values: Tensor, indices: Tensor | None) -> Tensor:
        """The image under each sample's window (``indices [B, w*w]`` row-major grid cells; ``None``: the whole
        image) in [-1, 1], resized."""
        images = (pixel_values.float() * self.image_std + self.image_mean).clamp(0, 1) * 2 - 1
        if indices is None:
            return F.interpolate(images, size=(self.crop_size, self.crop_size), mode="bilinear")
        side = self.lare.grid()
        patch = pixel_values.shape[-1] // side
        window = int(round(indices.shape[1] ** 0.5))
        crops = []
        for b in range(images.shape[0]):
            row, col = divmod(int(indices[b, 0]), side)
            crop = images[b, :, row * patch : (row + window) * patch, col * patch : (col + window) * patch]
            crops.append(F.interpolate(crop[None], size=(self.crop_size, self.crop_size), mode="bilinear")[0])
        return torch.stack(crops)

    def forward(
        self,
        answer_ids: Tensor,
        labels: Tensor,
        text_ids: Tensor | None = None,
        text_labels: Tensor | None = None,
        reasoning_ids: Tensor | None = None,
        reasoning_mask: Tensor | None = None,
        **prompt: Any,
    ) -> dict[str, Any]:
        from latent_core.latents import forward_with_latents

        from lare.losses import diffusion_loss, info_nce, mean_max_pool, symmetric_alignment

        vlm, config = self.lare.vlm, self.lare.config
        inputs = {k: v for k, v in prompt.items() if v is not None}
        if self.stage == 1:
            out = forward_with_latents(vlm, inputs, 0, labels=labels, answer_ids=answer_ids)
            return {"loss": out.loss, "aux_losses": {}}
        step = self.lare.step()
        loop = step.loop_kwargs(inputs["input_ids"])
        out = forward_with_latents(
            vlm, inputs, config.num_latents, labels=labels, step_fn=step, answer_ids=answer_ids, **loop
        )
        latents = out.latents
        aux: dict[str, Tensor] = {}
        if reasoning_ids is not None and "align" in self.terms:
            with torch.no_grad():
                text = vlm.model.language_model(input_ids=reasoning_ids, attention_mask=reasoning_mask)
            hidden = text.last_hidden_state.to(latents.dtype)
            if step.v_locals:
                anchors = torch.cat(step.v_locals, 1)
                aux |= symmetric_alignment(latents, hidden, reasoning_mask, anchors, None, self.temperature)
            else:  # w/o Extractor: no window, no visual anchors; the text term alone
                pooled = mean_max_pool(latents)
                aux["align_text"] = info_nce(pooled, mean_max_pool(hidden, reasoning_mask), self.temperature)
        if "img" in self.terms and None not in (self.reconstructor, self.vae, self.scheduler):
            with torch.no_grad():
                window = step.windows[-1] if step.windows else None  # w/o Extractor: the whole image
                crops = self._crops(inputs["pixel_values"], window).to(self.vae.dtype)
                x0 = self.vae.encode(crops).latent_dist.mean * self.vae.config.scaling_factor
            aux["img"] = diffusion_loss(self.reconstructor, x0, latents.to(x0.dtype), self.scheduler)
        if text_ids is not None and "text" in self.terms:
            text_step = self.lare.step()
            aux["text"] = forward_with_latents(
                vlm, inputs, config.num_latents, labels=text_labels, step_fn=text_step, answer_ids=text_ids,
                **text_step.loop_kwargs(inputs["input_ids"]),
            ).loss  # fmt: skip
        return {"loss": out.loss, "aux_losses": aux, "latents": latents}
