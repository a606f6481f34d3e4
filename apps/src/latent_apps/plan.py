"""``apps/cli plan``: the training plan of a method at the paper's size, without weights.

The base is built from its published ``config.json`` on the meta device (:func:`latent_core.configs.meta_model`),
then the method's **own** preparation runs on it, the code its trainer runs, not a copy:

=============  ==========================================================  =========================================
method         preparation                                                 defaults (config class)
=============  ==========================================================  =========================================
heima          :func:`heima.model.prepare_model` (thinking tokens + LoRA)   :class:`heima.config.HeimaConfig`
lavit          :func:`lavit.trainer.prepare_student` (K latents, phi)       :class:`lavit.config.LavitConfig`
lare           :func:`lare.model.compose_config`, ``add_image_token``,      :class:`lare.config.LareConfig`,
               :func:`lare.model.wrap_llava`, ``LareForTraining.set_stage``  :data:`lare.trainer.STAGE_BATCH`
interpreters   :func:`interpreters.trainer.prepare_interpreter`             :class:`interpreters.InterpreterConfig`
=============  ==========================================================  =========================================

No real tokenizer can be downloaded, so the preparation gets a **stand-in tokenizer** (:func:`stand_in_tokenizer`):
a word-level tokenizer with exactly as many entries as the released one and its special tokens at their real ids
(:data:`VOCABULARIES`). Token surgery therefore takes the ids the real run takes and adds the same rows: e.g.
LLaVA-CoT's tokenizer has 128,257 entries, so Heima's three thinking tokens get ids 128,257-128,259: ``lm_head``
(128,256 rows) grows to 128,260 and ``embed_tokens`` keeps mllama's 8 extra rows (128,264 -> 128,268), as
:func:`latent_core.tokens.add_special_tokens` grows them so that the class rebuilds the same shapes on reload.

Memory per GPU (:func:`memory_estimate`), for the batch and sequence in :class:`Workload`:

- weights 2 B x all parameters (bf16), gradients 2 B x trainable (bf16), fp32 master copy + Adam m, v: 12 B x trainable;
  ZeRO-1 shards the optimizer state over the N GPUs, ZeRO-2 also the gradients, ZeRO-3 also the weights (Rajbhandari
  et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", Sec. 5);
- activations of the language model per layer ``s*b*h*(34 + 5*a*s_kv/h)`` bytes (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", Sec. 4.1, Eq. 1; ``s_kv`` = ``s`` for self-attention, the
  image keys for mllama's cross-attention layers); with activation checkpointing each layer keeps its bf16 input
  ``2*s*b*h`` and one layer at a time is recomputed in full. The frozen vision tower keeps nothing for backward (no
  parameter of it and no input needs a gradient);
- the logits: ``b*s*V*(2 + 4)`` bytes (bf16, and the fp32 copy the cross-entropy takes);
- LaViT: the attention rows its recorder keeps for L_traj (:func:`latent_core.record_attention`: every self-attention
  layer, fp32 probabilities of the K latent query rows over all keys, per head, saved by the softmax for backward):
  ``b*K*s*a*L*4`` bytes.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_MODELS",
    "METHODS",
    "VOCABULARIES",
    "ZERO_STAGES",
    "Plan",
    "Workload",
    "build_plan",
    "lora_groups",
    "memory_estimate",
    "render",
    "stand_in_tokenizer",
]

METHODS: tuple[str, ...] = ("heima", "lavit", "lare", "interpreters")
DEFAULT_MODELS: dict[str, str] = {
    "heima": "llava-cot-11b",  # METHODS.md section 1: LLaVA-CoT = Llama-3.2-11B-Vision
    "lavit": "qwen2.5-vl-3b",  # METHODS.md section 2: the student
    "lare": "clip-vit-l-14+qwen2.5-0.5b",  # METHODS.md section 3: CLIP ViT-L/14 + Qwen2.5-0.5B-Instruct
    "interpreters": "llama-3.1-8b-instruct",  # METHODS.md section 1 "Interpreters"
}
ZERO_STAGES: dict[str, int] = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}

GIB = 1024**3

# ------------------------------------------------------------------------------------------------ stand-in tokenizers


@dataclass(frozen=True)
class Vocabulary:
    """What token surgery needs of a released tokenizer: its length and its special tokens at their ids (``special``:
    registered as special tokens, as the released ``tokenizer_config.json`` marks them; ``plain``: in the vocabulary
    only)."""

    size: int
    special: dict[str, int]
    plain: dict[str, int] = field(default_factory=dict)


def _llama3(size: int, extra: dict[str, int]) -> Vocabulary:
    named = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004,
        "<|reserved_special_token_2|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
    }  # fmt: skip
    reserved = {f"<|reserved_special_token_{i}|>": 128008 + i for i in range(3, 248)}  # 128011 .. 128255
    return Vocabulary(size, {**named, **reserved, **extra})


_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
_QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"]  # fmt: skip

VOCABULARIES: dict[str, Vocabulary] = {
    # Llama-3.1-8B-Instruct: 128,000 BPE tokens + 256 special ones (248 reserved).
    "llama3": _llama3(128256, {}),
    # Llama-3.2-11B-Vision(-Instruct) and LLaVA-CoT: Llama-3's + <|image|> at 128,256 (embed_tokens has 128,264 rows).
    "llama3-vision": _llama3(128257, {"<|image|>": 128256}),
    # Vicuna-7B v1.5: the Llama-2 SentencePiece vocabulary, 32,000 entries.
    "llama2": Vocabulary(32000, {"<unk>": 0, "<s>": 1, "</s>": 2}),
    # llava-hf's LLaVA-NeXT-Vicuna-7B: Vicuna's + <image> (32,000) + <pad> (32,001); the tables have 32,064 rows.
    "llava-next": Vocabulary(32002, {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}),
    # Qwen2.5 / Qwen2.5-VL: 151,643 BPE tokens + 22 added ones (151,643 .. 151,664); the tables have 151,936 rows.
    "qwen2.5": Vocabulary(
        151665,
        {t: 151643 + i for i, t in enumerate(_QWEN_SPECIAL)},
        {t: 151657 + i for i, t in enumerate(_QWEN_PLAIN)},
    ),
}
"""The released tokenizers the shipped configs go with (their ``tokenizer.json`` / ``tokenizer_config.json``)."""

_VOCABULARY_OF: dict[str, str] = {
    "llava-cot-11b": "llama3-vision",
    "llama-3.2-11b-vision": "llama3-vision",
    "llava-next-vicuna-7b": "llava-next",
    "llama-3.1-8b-instruct": "llama3",
    "vicuna-7b": "llama2",
    "qwen2.5-vl-3b": "qwen2.5",
    "qwen2.5-vl-7b": "qwen2.5",
    "qwen2.5-vl-32b": "qwen2.5",
    "qwen2.5-0.5b": "qwen2.5",
    "qwen2.5-1.5b": "qwen2.5",
    "qwen2.5-7b": "qwen2.5",
}

# Ordinary words the preparations encode (Heima initialises each thinking token from its stage's name).
_WORDS = ("summary", "caption", "reasoning", "conclusion", "image", "question", "answer")


def stand_in_tokenizer(vocabulary: str | Vocabulary) -> Any:
    """A fast word-level tokenizer with ``len() == vocabulary.size`` and the special tokens at their released ids;
    the rest of the entries are fillers, a few low ids are ordinary words (:data:`_WORDS`). Built in well under a
    second even for 152k entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = VOCABULARIES[vocabulary] if isinstance(vocabulary, str) else vocabulary
    names = [f"<filler_{i}>" for i in range(vocab.size)]
    for i, word in enumerate(_WORDS):
        names[i + 1] = word
    for token, i in {**vocab.plain, **vocab.special}.items():
        names[i] = token
    tokenizer = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token=names[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=names[0])
    wrapped.add_special_tokens({"extra_special_tokens": list(vocab.special)}, replace_extra_special_tokens=False)
    if len(wrapped) != vocab.size:  # pragma: no cover - a table above that repeats an id
        raise RuntimeError(f"stand-in tokenizer has {len(wrapped)} entries, expected {vocab.size}")
    return wrapped


def _tokenizer_for(name: str) -> Any:
    """The stand-in tokenizer of a shipped alias; the real one (``load_processor``) for a local path or other id."""
    from latent_core.configs import shipped_alias

    alias = shipped_alias(name)
    if alias in _VOCABULARY_OF:
        return stand_in_tokenizer(_VOCABULARY_OF[alias])
    from latent_core.hub import load_processor

    processor = load_processor(name)
    return getattr(processor, "tokenizer", processor)


# ------------------------------------------------------------------------------------------------ workload and memory


@dataclass
class Workload:
    """One micro-batch on one GPU: ``batch`` samples of ``text`` text tokens, ``image`` image tokens in the sequence
    (0 for mllama and text models), ``latents`` latent positions, and ``cross_keys`` keys of mllama's cross-attention
    layers (the image tiles' patches). ``source`` says where each number comes from."""

    batch: int
    text: int
    image: int = 0
    latents: int = 0
    cross_keys: int = 0
    source: str = ""

    @property
    def sequence(self) -> int:
        return self.text + self.image + self.latents


def _layer_activations(s: int, b: int, h: int, a: int, kv: int) -> int:
    """Korthikanti et al. 2022, Eq. 1 (no tensor/sequence parallelism): ``s*b*h*(34 + 5*a*kv/h)`` bytes."""
    return 34 * s * b * h + 5 * a * s * kv * b


def memory_estimate(
    *,
    total: int,
    trainable: int,
    zero: int,
    gpus: int,
    layers: list[bool],
    hidden: int,
    heads: int,
    vocab: int,
    workload: Workload,
    recorder_layers: int = 0,
) -> dict[str, int]:
    """Bytes per GPU (see the module docstring for every formula). ``layers``: per language-model layer, whether it
    is a cross-attention layer (its keys are ``workload.cross_keys``). ``recorder_layers``: LaViT's recorded layers."""
    n = max(1, gpus)
    s, b = workload.sequence, workload.batch
    per_layer = [_layer_activations(s, b, hidden, heads, workload.cross_keys if cross else s) for cross in layers]
    out = {
        "weights": math.ceil(2 * total / (n if zero >= 3 else 1)),
        "gradients": math.ceil(2 * trainable / (n if zero >= 2 else 1)),
        "optimizer": math.ceil(12 * trainable / (n if zero >= 1 else 1)),
        "activations": sum(per_layer),
        "activations_checkpointed": 2 * s * b * hidden * len(layers) + max(per_layer, default=0),
        "logits": b * s * vocab * 6,
    }
    if recorder_layers:
        out["attention_rows"] = b * workload.latents * s * heads * recorder_layers * 4
    fixed = out["weights"] + out["gradients"] + out["optimizer"] + out["logits"] + out.get("attention_rows", 0)
    out["total"] = fixed + out["activations"]
    out["total_checkpointed"] = fixed + out["activations_checkpointed"]
    return out


# ------------------------------------------------------------------------------------------------ counting


def _parts_of(model: nn.Module) -> tuple[nn.Module, Any]:
    """The transformers model inside ``model`` (a PEFT model, LaViT's student, an interpreter, LaRe's training
    module) and its :class:`latent_core.ModelParts`."""
    import transformers
    from latent_core.families import _unwrap_peft, model_parts

    for module in model.modules():
        base = _unwrap_peft(module)
        if isinstance(base, transformers.PreTrainedModel):
            return base, model_parts(base)
    raise TypeError(f"no transformers model inside {type(model).__name__}")


def _parts_of_module(module: nn.Module) -> nn.Module:
    from latent_core.families import _unwrap_peft

    return _unwrap_peft(module)


PARTS = ("vision tower", "projector", "language model", "embeddings / lm_head", "new token rows", "LoRA")
BASE_PARTS = PARTS[:4]
"""The parts of the transformers model itself (after token surgery); the rest are added by the method."""


def count_parts(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{part: {"total", "trainable"}}`` over :data:`PARTS` and, for parameters outside the transformers model, one
    part per top-level submodule of ``model`` (``phi``, ``extractor``, ``reconstructor``, ``projector`` of an
    interpreter). Each tensor is counted once (tied tables are one tensor)."""
    from latent_core.trainable_rows import TrainableRows

    base, parts = _parts_of(model)
    ids: dict[str, set[int]] = {
        "vision tower": {id(p) for p in parts.vision_tower.parameters()} if parts.vision_tower is not None else set(),
        "projector": {id(p) for n, m in base.named_modules() if n.endswith("multi_modal_projector")
                      for p in m.parameters()},
        "embeddings / lm_head": {id(p) for m in (parts.input_embeddings, parts.lm_head) for p in m.parameters()},
        "language model": {id(p) for p in parts.language_model.parameters()},
        "new token rows": {id(p) for m in model.modules() if isinstance(m, TrainableRows) for p in m.parameters()},
    }  # fmt: skip
    inside = {id(p) for p in base.parameters()}
    # wrapper modules on the way to the transformers model (``lare`` of LaRe's training module): not a part's name
    base_path = next((n for n, m in model.named_modules() if m is base or _parts_of_module(m) is base), "")
    wrappers = {".".join(base_path.split(".")[:i]) for i in range(1, len(base_path.split(".")))}
    counts: dict[str, dict[str, int]] = {name: {"total": 0, "trainable": 0} for name in PARTS}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            part = "LoRA"
        elif "trainable_tokens_delta" in name or id(p) in ids["new token rows"]:
            part = "new token rows"
        elif id(p) not in inside:
            keys = name.split(".")
            depth = next(i for i in range(len(keys)) if ".".join(keys[: i + 1]) not in wrappers)
            part = keys[depth]
            if part in PARTS:  # an interpreter's ``projector`` is a module of its own, not the VLM's
                part = f"{part} (added)"
        else:
            part = next(
                (k for k in ("vision tower", "projector", "embeddings / lm_head", "language model") if id(p) in ids[k]),
                "language model",
            )
        entry = counts.setdefault(part, {"total": 0, "trainable": 0})
        entry["total"] += p.numel()
        entry["trainable"] += p.numel() if p.requires_grad else 0
    return counts


def lora_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The modules LoRA adapts, grouped: ``{"pattern": "model.language_model.layers.*.cross_attn.{q,k,v,o}_proj",
    "layers": 8}`` (names inside the transformers model; ``layers`` = how many decoder layers have them, 1 for a
    module outside the layers such as ``lm_head``)."""
    from peft.tuners.lora import LoraLayer

    base, _ = _parts_of(model)
    found: dict[tuple[str, str], set[int]] = defaultdict(set)
    order: list[tuple[str, str]] = []
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or not len(module.lora_A):
            continue
        match = re.fullmatch(r"(.*\.layers)\.(\d+)\.(.*)", name)
        key = (match[1], match[3]) if match else (name, "")
        if key not in found:
            order.append(key)
        found[key].add(int(match[2]) if match else 0)
    merged: dict[tuple[str, str, frozenset[int]], list[str]] = {}
    for prefix, suffix in order:
        parent, _, leaf = suffix.rpartition(".")
        merged.setdefault((prefix, parent, frozenset(found[prefix, suffix])), []).append(leaf)
    groups = []
    for (prefix, parent, layers), leaves in merged.items():
        if not leaves[0]:
            groups.append({"pattern": prefix, "layers": 1})
            continue
        if len(leaves) > 1 and all(leaf.endswith("_proj") for leaf in leaves):
            leaf = "{" + ",".join(leaf.removesuffix("_proj") for leaf in leaves) + "}_proj"
        else:
            leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        groups.append({"pattern": f"{prefix}.*.{parent + '.' if parent else ''}{leaf}", "layers": len(layers)})
    return groups


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """Everything ``apps/cli plan`` prints (:meth:`as_dict` is its ``--json`` line)."""

    method: str
    model: str
    hub_id: str
    model_class: str
    family: str
    deepspeed: str
    gpus: int
    base_parameters: int
    total: int
    trainable: int
    parts: dict[str, dict[str, int]]
    lora: dict[str, Any]
    frozen: list[str]
    tokens: dict[str, Any]
    workload: dict[str, Any]
    memory: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory_gib"] = {k: round(v / GIB, 3) for k, v in self.memory.items()}
        return out


def _rows(model: nn.Module) -> tuple[int, int]:
    from latent_core.families import model_parts
    from latent_core.zero3 import num_rows

    parts = model_parts(model)
    return num_rows(parts.input_embeddings), num_rows(parts.lm_head)


def _check_family(config: Any, families: tuple[str, ...], method: str) -> Any:
    from latent_core.families import require_family

    return require_family(config, families, method)


def _heima(name: str) -> tuple[nn.Module, Any, dict[str, Any], Workload, list[str]]:
    from heima.config import STAGES, SUPPORTED_FAMILIES, HeimaConfig
    from heima.model import prepare_model
    from latent_core.configs import meta_model, published_config
    from latent_core.thinking import thinking_tokens

    config = published_config(name)
    spec = _check_family(config, SUPPORTED_FAMILIES, "heima")
    args = HeimaConfig()
    tokens = [t for k in STAGES for t in thinking_tokens(k, args.tokens_per_stage)]  # as heima.data.prepare lists them
    base = meta_model(config)
    tokenizer = _tokenizer_for(name)
    surgery = _surgery_before(base, tokenizer, tokens)
    with torch.device("meta"):
        model = prepare_model(args, base, tokenizer, tokens)
    _surgery_after(surgery, base, tokenizer)
    vision = config.vision_config
    notes = [f"LoRA r={args.lora_r}, alpha={args.lora_alpha}, dropout={args.lora_dropout} (Table A1)"]
    if spec.name == "mllama":
        patches = (vision.image_size // vision.patch_size) ** 2 + 1
        keys = vision.max_num_tiles * patches
        work = Workload(args.per_device_train_batch_size, 1024, cross_keys=keys, source=(
            f"batch {args.per_device_train_batch_size} per device (HeimaConfig: Table A2's progressive stages; the "
            f"recovering stage uses {args.recover_batch_size}); 1024 text tokens (choice: prompt + staged CoT answer "
            f"of LLaVA-CoT-100k, stage 0 is the longest); cross-attention keys {vision.max_num_tiles} tiles x "
            f"{patches} patches = {keys}"))  # fmt: skip
    else:
        image = _image_tokens(config)
        work = Workload(args.per_device_train_batch_size, 1024, image=image, source=(
            f"batch {args.per_device_train_batch_size} per device (HeimaConfig, Table A2); 1024 text tokens (choice) + "
            f"{image} image tokens in the sequence (the family's largest image)"))  # fmt: skip
    return model, config, surgery, work, notes


def _image_tokens(config: Any) -> int:
    """Image tokens in the sequence for the family's largest image: LLaVA-NeXT's anyres at its biggest pinpoint (base
    grid + the unpadded grid with one newline per row), Qwen2.5-VL at LaViT's max_pixels (28x28 pixels per merged
    token), llava's one token per patch."""
    vision = getattr(config, "vision_config", None)
    if config.model_type == "llava_next":
        side = vision.image_size // vision.patch_size
        h, w = max(config.image_grid_pinpoints, key=lambda p: p[0] * p[1])
        rows, cols = h // vision.patch_size, w // vision.patch_size
        return side * side + rows * (cols + 1)
    if config.model_type == "qwen2_5_vl":
        from lavit.inputs import MAX_PIXELS

        merge = vision.spatial_merge_size * vision.patch_size
        return MAX_PIXELS // (merge * merge)
    if vision is not None and hasattr(vision, "image_size"):
        return (vision.image_size // vision.patch_size) ** 2
    return 0


def _lavit(name: str, teacher: str) -> tuple[nn.Module, Any, dict[str, Any], Workload, list[str]]:
    from latent_core.configs import meta_model, published_config
    from lavit.config import LavitConfig, latent_tokens
    from lavit.trainer import SUPPORTED_FAMILIES, prepare_student

    config = published_config(name)
    _check_family(config, SUPPORTED_FAMILIES, "lavit")
    teacher_config = published_config(teacher)
    _check_family(teacher_config, SUPPORTED_FAMILIES, "lavit (teacher)")
    teacher_hidden = teacher_config.get_text_config().hidden_size
    args = LavitConfig()
    base = meta_model(config)
    tokenizer = _tokenizer_for(name)
    surgery = _surgery_before(base, tokenizer, latent_tokens(args.num_latents))
    with torch.device("meta"):
        model = prepare_student(args, base, tokenizer, teacher_hidden)
    _surgery_after(surgery, base, tokenizer)
    image = _image_tokens(config)
    work = Workload(args.per_device_train_batch_size, 512, image=image, latents=args.num_latents, source=(
        f"batch {args.per_device_train_batch_size} per device (LavitConfig, Table A1); 512 text tokens (choice: "
        f"system prompt, Visual-CoT question and answer); {image} image tokens at max_pixels {args.max_pixels:,} "
        f"(28x28 pixels per merged token); K = {args.num_latents} latents"))  # fmt: skip
    notes = [
        f"teacher {teacher} ({teacher_config._name_or_path}): hidden {teacher_hidden} = phi's output (V_sem)",
        "full fine-tuning of the LLM (Table A1; LavitConfig.lora_r = 0), vision tower frozen",
    ]
    return model, config, surgery, work, notes


def _lare(name: str, stage: int, vae_channels: int) -> tuple[nn.Module, Any, dict[str, Any], Workload, list[str]]:
    from lare.config import LareConfig, LareTrainConfig
    from lare.losses import Reconstructor, unet_config
    from lare.model import LareForTraining, add_image_token, compose_config, wrap_llava
    from lare.trainer import STAGE_BATCH
    from latent_core.cli import UserError
    from latent_core.configs import meta_model, published_config

    if "+" in name:
        vision_name, llm_name = (part.strip() for part in name.split("+", 1))
        vision = published_config(vision_name)
        vision = getattr(vision, "vision_config", vision)
        if vision.model_type != "clip_vision_model":
            raise UserError(f"lare composes a CLIP vision tower: {vision_name!r} is {vision.model_type!r}")
        text = published_config(llm_name)
        _check_family(text, ("causal_lm",), "lare (the LLM part)")
        config = compose_config(vision, text)
        tokenizer = _tokenizer_for(llm_name)
    else:
        config = published_config(name)
        _check_family(config, ("llava",), "lare")
        tokenizer = _tokenizer_for(name)
    if stage not in STAGE_BATCH:
        raise UserError(f"LaRe has stages 1-4 (Appendix A), got --stage {stage}")
    lare_config = LareConfig()
    base = meta_model(config)
    tokens = ["<image>"] if "+" in name else []
    surgery = _surgery_before(base, tokenizer, [*tokens, lare_config.bot_token, lare_config.eot_token])
    train = LareTrainConfig()
    with torch.device("meta"):
        if tokens:
            add_image_token(base, tokenizer)  # lare.compose: LLaVA's <image> joins the LLM's tokenizer
        lare = wrap_llava(base, tokenizer, lare_config)
        reconstructor = None
        if stage > 1:  # L_img's U-Net (METHODS.md section 3), trained from stage II on
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel(**unet_config(train.crop_size // 16, vae_channels))
            reconstructor = Reconstructor(base.config.get_text_config().hidden_size, unet)
        model = LareForTraining(lare, reconstructor, None, None, stage)
    _surgery_after(surgery, base, tokenizer)
    image = _image_tokens(config)
    work = Workload(STAGE_BATCH[stage], 512, image=image, latents=lare_config.num_latents + 2, source=(
        f"global batch {STAGE_BATCH[stage]} in stage {stage} (Appendix A: 256 in I, 128 after) over the GPUs; 512 text "
        f"tokens (choice: question + answer); {image} image tokens (CLIP at 224 px); <bot>, T = "
        f"{lare_config.num_latents} latents, <eot>"))  # fmt: skip
    notes = [
        f"stage {stage} trains {', '.join(sorted(_stage_groups(stage, reconstructor is not None)))} (lare.model."
        "STAGE_GROUPS); the vision tower is frozen in every stage",
    ]
    if reconstructor is not None:
        notes.append(
            f"reconstructor: the paper's U-Net on a KL-f16 VAE latent of {vae_channels} channels (choice, "
            f"--vae-channels) at {train.crop_size // 16}x{train.crop_size // 16}; the frozen VAE is not "
            "counted"
        )
    return model, config, surgery, work, notes


def _stage_groups(stage: int, reconstructor: bool) -> set[str]:
    from lare.model import STAGE_GROUPS

    return {g for g in STAGE_GROUPS[stage] if g != "reconstructor" or reconstructor}


def _interpreters(name: str, heima_model: str) -> tuple[nn.Module, Any, dict[str, Any], Workload, list[str]]:
    from interpreters.config import SUPPORTED_FAMILIES, InterpreterConfig, choose_placeholder
    from interpreters.trainer import prepare_interpreter
    from latent_core.configs import meta_model, published_config

    config = published_config(name)
    _check_family(config, SUPPORTED_FAMILIES, "interpreters")
    heima_hidden = published_config(heima_model).get_text_config().hidden_size
    args = InterpreterConfig()
    base = meta_model(config)
    tokenizer = _tokenizer_for(name)
    placeholder, origin = choose_placeholder(tokenizer, args.placeholder)
    surgery = _surgery_before(base, tokenizer, [placeholder])
    with torch.device("meta"):
        model, origin = prepare_interpreter(args, base, tokenizer, heima_hidden)
    _surgery_after(surgery, base, tokenizer)
    work = Workload(args.per_device_train_batch_size, 512, source=(
        f"batch {args.per_device_train_batch_size} per device (InterpreterConfig, Table A3); 512 text tokens (choice: "
        "explanatory prompt + one CoT stage)"))  # fmt: skip
    notes = [
        f"placeholder {placeholder} ({origin})",
        f"hidden states of {heima_model}: {heima_hidden} -> the LM's {config.hidden_size} ({args.projector} projector)",
        f"LoRA r={args.lora_r}, alpha={args.lora_alpha} (Table A3)",
    ]
    return model, config, surgery, work, notes


def _surgery_before(base: nn.Module, tokenizer: Any, tokens: list[str]) -> dict[str, Any]:
    emb, head = _rows(base)
    return {"tokens": list(tokens), "new": [t for t in tokens if t not in tokenizer.get_vocab()],
            "tokenizer": [len(tokenizer)], "embedding_rows": [emb], "lm_head_rows": [head]}  # fmt: skip


def _surgery_after(surgery: dict[str, Any], base: nn.Module, tokenizer: Any) -> None:
    emb, head = _rows(base)
    surgery["tokenizer"].append(len(tokenizer))
    surgery["embedding_rows"].append(emb)
    surgery["lm_head_rows"].append(head)
    surgery["ids"] = [int(i) for i in tokenizer.convert_tokens_to_ids(surgery["tokens"])]


def build_plan(
    method: str,
    model: str | None = None,
    *,
    deepspeed: str = "zero0",
    gpus: int = 1,
    teacher: str = "qwen2.5-vl-32b",
    heima_model: str = "llava-cot-11b",
    stage: int = 4,
    vae_channels: int = 16,
    batch: int | None = None,
    text_tokens: int | None = None,
) -> Plan:
    """The plan of ``method`` on ``model`` (default :data:`DEFAULT_MODELS`) under ``deepspeed`` (``zero0`` .. ``zero3``)
    on ``gpus`` GPUs. ``teacher``: LaViT's teacher (its hidden size is phi's output); ``heima_model``: whose hidden
    states the interpreter reads; ``stage`` / ``vae_channels``: LaRe's stage (1-4) and its VAE's latent channels;
    ``batch`` / ``text_tokens`` override the workload's per-device batch and text length.

    Raises:
        latent_core.cli.UserError: an unknown method or ZeRO stage, or a bad number.
        latent_core.UnknownAliasError / latent_core.FamilyError: an unknown model, or a model the method cannot use.
    """
    from latent_core.cli import UserError
    from latent_core.configs import count_parameters
    from latent_core.families import family_of

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if deepspeed not in ZERO_STAGES:
        raise UserError(f"unknown --deepspeed {deepspeed!r}; choose one of {', '.join(ZERO_STAGES)}")
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    model = model or DEFAULT_MODELS[method]
    if method == "heima":
        prepared, config, surgery, work, notes = _heima(model)
    elif method == "lavit":
        prepared, config, surgery, work, notes = _lavit(model, teacher)
    elif method == "lare":
        prepared, config, surgery, work, notes = _lare(model, stage, vae_channels)
        work.batch = math.ceil(work.batch / gpus)  # LaRe's batch is global (Appendix A)
    else:
        prepared, config, surgery, work, notes = _interpreters(model, heima_model)
    if batch is not None:
        work.batch, work.source = batch, f"batch {batch} per device (--batch); " + work.source.split("; ", 1)[-1]
    if text_tokens is not None:
        work.text, work.source = text_tokens, work.source + f"; text tokens {text_tokens} (--text-tokens)"

    base, parts = _parts_of(prepared)
    counts = count_parts(prepared)
    total, trainable = count_parameters(prepared), count_parameters(prepared, trainable=True)
    base_parameters = sum(counts[k]["total"] for k in BASE_PARTS)
    text = base.config.get_text_config()
    layers = [i in set(parts.cross_attention_layers) for i in range(len(parts.decoder_layers))]
    recorder = len([c for c in layers if not c]) if method == "lavit" else 0
    memory = memory_estimate(
        total=total, trainable=trainable, zero=ZERO_STAGES[deepspeed], gpus=gpus, layers=layers,
        hidden=text.hidden_size, heads=text.num_attention_heads, vocab=_rows(base)[1], workload=work,
        recorder_layers=recorder,
    )  # fmt: skip
    peft_config = getattr(next((m for m in prepared.modules() if hasattr(m, "peft_config")), None), "peft_config", {})
    lora_config = next(iter(peft_config.values()), None) if peft_config else None
    lora = {"r": getattr(lora_config, "r", None), "alpha": getattr(lora_config, "lora_alpha", None),
            "targets": lora_groups(prepared)}  # fmt: skip
    try:
        family = family_of(base.config).name
    except ValueError:  # pragma: no cover - every prepared base is of a family
        family = "-"
    frozen = [k for k, c in counts.items() if c["total"] and not c["trainable"]]
    if parts.vision_tower is not None and not counts["projector"]["total"]:
        notes.append("the vision-to-text merger belongs to the vision tower (Qwen2.5-VL's model.visual.merger)")
    return Plan(
        method=method, model=model, hub_id=str(getattr(config, "_name_or_path", "") or model),
        model_class=type(base).__name__, family=family, deepspeed=deepspeed, gpus=gpus,
        base_parameters=base_parameters, total=total, trainable=trainable, parts=counts, lora=lora, frozen=frozen,
        tokens=surgery, workload={**asdict(work), "sequence": work.sequence}, memory=memory, notes=notes,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ text


def render(plan: Plan) -> str:
    """The plan as text (what ``apps/cli plan`` prints before its ``--json`` line)."""
    zero = ZERO_STAGES[plan.deepspeed]
    share = f"{100 * plan.trainable / plan.total:.2f}%" if plan.total else "-"
    lines = [
        f"plan: {plan.method} on {plan.model} ({plan.hub_id}, {plan.model_class}), {plan.deepspeed} on {plan.gpus} "
        f"GPU{'s' if plan.gpus > 1 else ''}",
        f"parameters: total {plan.total:,} (base after token surgery {plan.base_parameters:,} + added modules "
        f"{plan.total - plan.base_parameters:,}); trainable {plan.trainable:,} ({share})",
        "",
        f"  {'part':<24}{'total':>16}{'trainable':>16}",
    ]
    for name, c in plan.parts.items():
        if c["total"] or name in PARTS:
            lines.append(f"  {name:<24}{c['total']:>16,}{c['trainable']:>16,}")
    t = plan.tokens
    if t["tokens"]:
        new = ", ".join(t["new"]) or "none (already in the vocabulary)"
        lines += [
            "",
            f"token surgery: {len(t['tokens'])} token(s) {', '.join(t['tokens'])} -> ids {t['ids']} (new: {new}); "
            f"tokenizer {t['tokenizer'][0]:,} -> {t['tokenizer'][1]:,}, input embedding rows {t['embedding_rows'][0]:,}"
            f" -> {t['embedding_rows'][1]:,}, lm_head rows {t['lm_head_rows'][0]:,} -> {t['lm_head_rows'][1]:,}",
        ]
    if plan.lora["targets"]:
        lines += ["", f"LoRA (r={plan.lora['r']}, alpha={plan.lora['alpha']}) on:"]
        lines += [
            f"  {g['pattern']}: {g['layers']} layer{'s' if g['layers'] > 1 else ''}" for g in plan.lora["targets"]
        ]
    else:
        lines += ["", "LoRA: none"]
    lines += ["", f"frozen: {', '.join(plan.frozen) or 'nothing'}"]
    lines += [f"note: {note}" for note in plan.notes]
    w, m = plan.workload, plan.memory
    n = plan.gpus

    def shard(stage: int) -> str:
        return f" / {n}" if zero >= stage and n > 1 else ""

    rows = [
        (f"weights, bf16: 2 B x {plan.total:,}{shard(3)}", m["weights"]),
        (f"gradients, bf16: 2 B x {plan.trainable:,}{shard(2)}", m["gradients"]),
        (f"fp32 master + Adam m, v: 12 B x {plan.trainable:,}{shard(1)}", m["optimizer"]),
        ("activations, no checkpointing: L x s*b*h*(34 + 5*a*s_kv/h) (1)", m["activations"]),
        ("activations, checkpointing: L x 2*s*b*h + one layer (1)", m["activations_checkpointed"]),
        ("logits: b*s*V*(2 + 4) B", m["logits"]),
    ]
    if "attention_rows" in m:
        rows.append(("recorded attention rows (L_traj): b*K*s*a*L*4 B", m["attention_rows"]))
    rows += [("total, with activation checkpointing", m["total_checkpointed"]),
             ("total, without activation checkpointing", m["total"])]  # fmt: skip
    width = max(len(label) for label, _ in rows) + 2
    lines += [
        "",
        f"memory per GPU ({plan.deepspeed}, {n} GPU{'s' if n > 1 else ''}; micro-batch {w['batch']} x {w['sequence']} "
        f"tokens; {w['source']}):",
        *(f"  {label:<{width}}{value / GIB:9.2f} GiB" for label, value in rows),
        "(1) Korthikanti et al. 2022, Reducing Activation Recomputation in Large Transformer Models, Sec. 4.1; the "
        "5*a*s_kv/h term is the attention matrix eager attention keeps (SDPA / flash kernels keep none of it): an "
        "upper bound",
    ]
    return "\n".join(lines)
