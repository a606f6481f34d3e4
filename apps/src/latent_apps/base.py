"""`latent make-base`: small VLMs of the real transformers classes, trained from scratch on the shapes task.

No real weights can be downloaded here, so every method proves itself on the synthetic shapes task
(:mod:`latent_apps.shapes`) starting from a base that really solves it (METHODS.md section 6). A base is a model
of the family's real class (``MllamaForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``; and ``causal_lm``, a text-only Llama: the
interpreters' base, trained on the same answers without the image) with the family's real processor and the tiny
zoo's tokenizer (:func:`latent_core.testing.tiny_tokenizer`), built at a size from :data:`SIZES` and trained
with **every weight trainable** (vision tower, projector, language model, embeddings) on the full staged-CoT
answers of the shapes train split, with :class:`latent_core.LatentTrainer` (HF ``Trainer``: AdamW, warm-up and
cosine decay, gradient clipping, checkpoints every ``save_steps`` that a re-run resumes from after a kill).

Image geometry: the shapes images (96 px, 3x3 cells of 32 px) are resized by the processor to 84 px, so one cell
is 28 px: 2x2 patches of 14 px. Qwen2.5-VL merges 2x2 patches, so each of its 9 image tokens is one cell; mllama
sees one 84 px tile of 6x6 patches (its cross-attention keys); llava's CLIP gives 6x6 = 36 image tokens.

The saved directory is a normal checkpoint (``save_pretrained`` + processor) that ``latent_core.load_model`` and
every method CLI load, plus ``make_base.json`` (the command, seed, sizes, loss curve, evaluation) and ``eval/``
(``latent eval --method cot`` on the test split, with the blank-image control and the majority baseline).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from latent_core.cli import default_threads
from latent_core.families import get_family

__all__ = ["BASE_FAMILIES", "MIXES", "SIZES", "BaseSize", "base_shapes", "build_base", "make_base"]

BASE_FAMILIES: tuple[str, ...] = ("mllama", "qwen2_5_vl", "llava", "llava_next", "causal_lm")
IMAGE_PX = 84  # processor input side: 3 cells of 28 px = 2x2 patches of 14 px each
PATCH = 14
MAKE_BASE_NAME = "make_base.json"


@dataclass(frozen=True)
class BaseSize:
    """Dimensions of a base: the language model (``hidden``, ``layers``, ``heads``; MLP 4x hidden) and the vision
    tower (``vision_hidden``, ``vision_layers``)."""

    hidden: int
    layers: int
    heads: int
    vision_hidden: int
    vision_layers: int


SIZES: dict[str, BaseSize] = {
    "tiny": BaseSize(hidden=64, layers=4, heads=4, vision_hidden=32, vision_layers=2),
    "small": BaseSize(hidden=128, layers=4, heads=4, vision_hidden=64, vision_layers=2),
    "deep": BaseSize(hidden=64, layers=8, heads=4, vision_hidden=32, vision_layers=2),
}
"""``tiny``: the bases every method starts from; ``small``: a larger one (LaViT's teacher); ``deep``: the tiny
width at twice the depth (serial depth is what latent steps add; issue 26)."""

MIXES: tuple[str, ...] = ("cot", "cot+direct", "cot+direct+partial")
"""What a base is trained on: ``cot``, the staged answers only; ``cot+direct``, each question twice, once with its
staged answer and once asked with :func:`latent_core.prompts.direct_prompt` and answered with its conclusion alone,
so that a direct answer is a trained skill (``latent eval --method direct``); ``cot+direct+partial``, a third time
asked with :func:`latent_core.prompts.partial_prompt` and answered with its short partial answer
(:func:`latent_apps.shapes.partial_answer`: the reasoning alone, a counting scan cut to one running count per row;
issue 26 item 1), so the aggregating kinds are also trained at an intermediate grain (``latent eval --method
partial``)."""


def _text_ids(tokenizer: Any) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _text_config(size: BaseSize) -> dict[str, Any]:
    return dict(
        hidden_size=size.hidden,
        intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=1024,
    )


def _build_qwen2_5_vl(tokenizer: Any, size: BaseSize):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    half = size.hidden // size.heads // 2  # rotary frequencies per head, split over (t, h, w) as M-RoPE does
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **_text_config(size),
            **_text_ids(tokenizer),
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope),
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=size.vision_layers,
            hidden_size=size.vision_hidden,
            intermediate_size=2 * size.vision_hidden,
            num_heads=2,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=2 * IMAGE_PX,
            out_hidden_size=size.hidden,
            fullatt_block_indexes=list(range(size.vision_layers)),
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    pixels = dict(min_pixels=IMAGE_PX * IMAGE_PX, max_pixels=IMAGE_PX * IMAGE_PX)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2, **pixels),
        video_processor=Qwen2VLVideoProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2, **pixels),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _build_mllama(tokenizer: Any, size: BaseSize):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    config = MllamaConfig(
        text_config=dict(
            **_text_config(size),
            **_text_ids(tokenizer),
            cross_attention_layers=list(range(1, size.layers, 2)),  # every other layer, as Llama-3.2-Vision
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            hidden_size=size.vision_hidden,
            intermediate_size=2 * size.vision_hidden,
            num_hidden_layers=size.vision_layers,
            num_global_layers=1,
            attention_heads=2,
            image_size=IMAGE_PX,
            patch_size=PATCH,
            max_num_tiles=1,
            supported_aspect_ratios=[[1, 1]],
            intermediate_layers_indices=[0],
            vision_output_dim=size.hidden,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": IMAGE_PX, "width": IMAGE_PX}, max_image_tiles=1),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    model = MllamaForConditionalGeneration(config)
    # transformers initialises mllama's tanh gates at 0, which hides the image from a fresh model; open them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate"):
                param.fill_(1.0)
    return model, processor


def _clip(size: BaseSize) -> dict[str, Any]:
    return dict(
        model_type="clip_vision_model",
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=2,
        image_size=IMAGE_PX,
        patch_size=PATCH,
        projection_dim=size.vision_hidden,
    )


def _llava_config_args(tokenizer: Any, size: BaseSize) -> dict[str, Any]:
    """The config arguments LLaVA and LLaVA-NeXT bases share: a CLIP tower, the last layer's patch features, one
    token per 14 px patch of the 84 px input."""
    return dict(
        vision_config=_clip(size),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_PX // PATCH) ** 2,
    )


def _llava_processor_args(tokenizer: Any) -> dict[str, Any]:
    """The processor arguments LLaVA and LLaVA-NeXT bases share (CLIP's class token counted as an extra token)."""
    return dict(
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def _build_llava(tokenizer: Any, size: BaseSize):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    config = LlavaConfig(
        text_config=dict(model_type="qwen2", **_text_config(size), **_text_ids(tokenizer), tie_word_embeddings=True),
        **_llava_config_args(tokenizer, size),
        tie_word_embeddings=True,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX}
        ),
        **_llava_processor_args(tokenizer),
    )
    return LlavaForConditionalGeneration(config), processor


def _build_llava_next(tokenizer: Any, size: BaseSize):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    pinpoints = [[IMAGE_PX, IMAGE_PX]]  # AnyRes with one tile: the base view plus one 84 px crop
    config = LlavaNextConfig(
        text_config=dict(model_type="llama", **_text_config(size), **_text_ids(tokenizer), tie_word_embeddings=False),
        **_llava_config_args(tokenizer, size),
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": IMAGE_PX},
            crop_size={"height": IMAGE_PX, "width": IMAGE_PX},
            image_grid_pinpoints=pinpoints,
        ),
        **_llava_processor_args(tokenizer),
    )
    return LlavaNextForConditionalGeneration(config), processor


def _build_causal_lm(tokenizer: Any, size: BaseSize):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **_text_config(size),
        **_text_ids(tokenizer),
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config), tokenizer


_BUILDERS = {
    "causal_lm": _build_causal_lm,
    "mllama": _build_mllama,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "llava": _build_llava,
    "llava_next": _build_llava_next,
}


def build_base(family: str, size: str = "tiny", seed: int = 0):
    """A freshly initialised ``(model, processor)`` of ``family`` at ``size`` (see the module docstring).

    Raises:
        ValueError: an unknown family or size (the message lists the known ones).
    """
    from latent_core.testing import tiny_tokenizer

    if family not in _BUILDERS:
        raise ValueError(f"make-base builds {', '.join(BASE_FAMILIES)}; got family {family!r}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    torch.manual_seed(seed)
    return _BUILDERS[family](tiny_tokenizer(family), SIZES[size])


# ---------------------------------------------------------------------------------------------------------------
# Vision warm-up: the tower learns what is in each cell before the language model learns to read it
# ---------------------------------------------------------------------------------------------------------------

CELL_CLASSES = 1 + 4 * 3  # empty, or one of 4 colours x 3 shapes (latent_apps.shapes.COLOURS x SHAPES)


def cell_features(model: Any, family: str, inputs: dict[str, torch.Tensor], grid: int = 3) -> torch.Tensor:
    """``[batch, grid * grid, hidden]``: what the language model receives from the image, per cell in reading
    order: Qwen2.5-VL's merged tokens (one per cell), or the average of each cell's patch tokens after the projector
    (mllama's cross-attention states without the class token, llava's image tokens, LLaVA-NeXT's base view)."""
    inner = model.model
    if family == "qwen2_5_vl":
        merged = inner.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        return merged.view(inputs["image_grid_thw"].shape[0], -1, merged.shape[-1])
    if family == "mllama":
        states = inner.vision_model(
            pixel_values=inputs["pixel_values"],
            aspect_ratio_ids=inputs["aspect_ratio_ids"],
            aspect_ratio_mask=inputs["aspect_ratio_mask"],
        ).last_hidden_state
        side = IMAGE_PX // PATCH
        patches = inner.multi_modal_projector(states[:, 0, 0, 1 : 1 + side * side])
    elif family in ("llava", "llava_next"):
        extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        side = IMAGE_PX // PATCH
        pooled = inner.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
        patches = torch.stack([p[: side * side] for p in pooled])  # LLaVA-NeXT: the base view comes first
    else:
        raise ValueError(f"no image cells for family {family!r}")
    b, n, d = patches.shape
    side = int(round(n**0.5))
    k = side // grid
    cells = patches.view(b, grid, k, grid, k, d).mean(dim=(2, 4))
    return cells.reshape(b, grid * grid, d)


def _cell_labels(objects: list[dict[str, Any]], grid: int) -> list[int]:
    from latent_apps.shapes import COLOURS, SHAPES

    labels = [0] * (grid * grid)
    for o in objects:
        labels[o["row"] * grid + o["col"]] = 1 + COLOURS.index(o["colour"]) * len(SHAPES) + SHAPES.index(o["shape"])
    return labels


def warm_up_vision(
    model: Any,
    processor: Any,
    family: str,
    shapes: Path,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train the vision tower and projector alone for ``steps`` steps, through a temporary linear head on
    :func:`cell_features`, to tell each cell's content (empty or colour x shape, from ``scenes.json``) and position.
    This stands in for the pretrained vision encoder every real VLM starts from (CLIP, Qwen-ViT); the head is then
    dropped. Returns the loss per step."""
    import random

    from PIL import Image

    scenes = json.loads((shapes / "scenes.json").read_text(encoding="utf-8"))
    grid = int(json.loads((shapes / "summary.json").read_text(encoding="utf-8"))["grid"])
    items = [
        (name, _cell_labels(scene["objects"], grid)) for name, scene in scenes.items() if scene["split"] == "train"
    ]
    hidden = model.config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, CELL_CLASSES + grid * grid)
    tower = [p for name, p in model.named_parameters() if not name.startswith(("model.language_model", "lm_head"))]
    optimizer = torch.optim.AdamW([*tower, *head.parameters()], lr=learning_rate, weight_decay=0.0)
    rng = random.Random(seed)
    positions = torch.arange(grid * grid)
    losses = []
    model.train()
    for _ in range(steps):
        batch = rng.sample(items, min(batch_size, len(items)))
        images = []
        for name, _ in batch:
            with Image.open(shapes / name) as handle:
                images.append(handle.convert("RGB"))
        nested = get_family(family).nested_images
        inputs = processor.image_processor(images=[[i] for i in images] if nested else images,
                                           return_tensors="pt")  # fmt: skip
        logits = head(cell_features(model, family, inputs, grid))
        labels = torch.tensor([labels for _, labels in batch])
        loss = torch.nn.functional.cross_entropy(
            logits[..., :CELL_CLASSES].reshape(-1, CELL_CLASSES), labels.view(-1)
        ) + torch.nn.functional.cross_entropy(
            logits[..., CELL_CLASSES:].reshape(-1, grid * grid), positions.repeat(len(batch))
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


class _FreezeVision:
    """A trainer callback that drops the gradients of the vision tower and projector for the first ``steps``
    optimizer steps (AdamW then leaves them unchanged): the language model first learns to read the warmed-up
    tower, then everything trains together."""

    def __init__(self, model: Any, steps: int) -> None:
        self.params = [
            p for name, p in model.named_parameters() if not name.startswith(("model.language_model", "lm_head"))
        ]
        self.steps = steps

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Freeze(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                if state.global_step < outer.steps:
                    for p in outer.params:
                        p.grad = None

        return Freeze()


def shapes_rows(path: Path, images: bool = True, mix: str = "cot") -> list[dict[str, Any]]:
    """Training rows ``{"id", "prompt", "answer", "image"}`` of a shapes LLaVA-CoT file (one per question; the
    prompt is the human turn without its ``<image>`` marker, exactly as :mod:`latent_core.prompts` built it).
    ``images=False`` (a text LM) drops the images. ``mix="cot+direct"`` (:data:`MIXES`) adds after each question its
    direct row: id ``<id>#direct``, the prompt through :func:`latent_core.prompts.direct_prompt`, the answer the
    staged answer's ``<CONCLUSION>``; ``"cot+direct+partial"`` then its partial row: id ``<id>#partial``, the prompt
    through :func:`latent_core.prompts.partial_prompt`, the answer :func:`latent_apps.shapes.partial_answer`."""
    from latent_core.prompts import direct_prompt, partial_prompt
    from latent_core.readers import parse_cot_stages

    from latent_apps.shapes import partial_answer

    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; choose one of {', '.join(MIXES)}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            human, gpt = record["conversations"][0]["value"], record["conversations"][1]["value"]
            rows.append(
                {
                    "id": record["id"],
                    "prompt": human.replace("<image>", "").strip(),
                    "answer": gpt,
                    "image": record["image"] if images else None,
                }
            )
            cot = rows[-1]
            if "direct" in mix:
                conclusion = parse_cot_stages(gpt).get("conclusion")
                if not conclusion:
                    raise ValueError(f"{path}: {record['id']} has no <CONCLUSION> to answer directly with")
                rows.append({**cot, "id": f"{record['id']}#direct", "prompt": direct_prompt(cot["prompt"]),
                             "answer": conclusion})  # fmt: skip
            if "partial" in mix:
                try:
                    partial = partial_answer(gpt)
                except ValueError as e:
                    raise ValueError(f"{path}: {record['id']}: {e}") from None
                rows.append({**cot, "id": f"{record['id']}#partial", "prompt": partial_prompt(cot["prompt"]),
                             "answer": partial})  # fmt: skip
    return rows


SHAPES_ARGS: tuple[str, ...] = ("n", "seed", "test_fraction", "grid", "image_size", "tint", "hops", "anchor_needed")
LEGACY_SHAPES_ARGS: dict[str, Any] = {"anchor_needed": False}
"""The value of a ``make_shapes`` argument that recorded arguments from before it was added do not name (hop
questions were drawn among every path then): what reproduces those data sets."""


def shapes_args(shapes: Path) -> dict[str, Any]:
    """The ``make_shapes`` arguments that wrote ``shapes`` (from its ``summary.json``): with them the same data set
    is written again, byte for byte, so a reproduction evaluates on the base's own test split."""
    summary = json.loads((Path(shapes) / "summary.json").read_text(encoding="utf-8"))
    return {k: summary[k] for k in SHAPES_ARGS if k in summary}


def recorded_shapes_args(base: Path) -> dict[str, Any]:
    """The ``make_shapes`` arguments a base's ``make_base.json`` records, with :data:`LEGACY_SHAPES_ARGS` for the
    arguments added after it was made."""
    recorded = json.loads((Path(base) / MAKE_BASE_NAME).read_text(encoding="utf-8"))["shapes_args"]
    return {**LEGACY_SHAPES_ARGS, **recorded}


def base_shapes(base: Path, out: Path) -> Path:
    """The shapes data set a base was trained on, written to ``out`` from the base's ``make_base.json`` (same
    arguments, same bytes) unless ``out`` already holds it: the base's own test split, for its evaluation.

    Raises:
        FileNotFoundError: ``base`` was not made by :func:`make_base`.
        ValueError: ``out`` holds another shapes data set.
    """
    from latent_apps.shapes import make_shapes

    base, out = Path(base), Path(out)
    info = base / MAKE_BASE_NAME
    if not info.is_file():
        raise FileNotFoundError(
            f"{base} is not a base made by make-base (no {MAKE_BASE_NAME}): pass a make-base output directory, or "
            "train one with `uv run apps/cli make-base --family FAMILY`"
        )
    args = recorded_shapes_args(base)
    summary = out / "summary.json"
    if summary.is_file():
        have = {**LEGACY_SHAPES_ARGS, **json.loads(summary.read_text(encoding="utf-8"))}
        if all(have.get(k) == v for k, v in args.items()):
            return out
    if (out / "train").exists():
        raise ValueError(f"{out} holds another shapes data set than the base's ({args}): choose another folder")
    make_shapes(out=out, **args)
    return out


def _check_shapes(shapes: Path) -> None:
    needed = ("summary.json", "train/llava_cot.jsonl", "test/llava_cot.jsonl", "images")
    missing = [p for p in needed if not (shapes / p).exists()]
    if missing:
        raise FileNotFoundError(
            f"{shapes} is not a shapes data set (missing {', '.join(missing)}): write one with "
            f"`uv run apps/cli make-shapes --n 4000 --out {shapes}`"
        )


def _last_checkpoint(directory: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(directory)) if directory.is_dir() else None


def make_base(
    family: str,
    shapes: str | Path,
    out: str | Path,
    size: str = "tiny",
    steps: int = 2500,
    seed: int = 0,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    warmup_steps: int = 100,
    vision_warmup_steps: int = 150,
    vision_freeze_steps: int = 600,
    threads: int | None = None,
    save_steps: int = 250,
    eval_samples: int | None = 400,
    eval_batch_size: int = 50,
    resume: bool = True,
    show_progress: bool = True,
    command: str | None = None,
    mix: str = "cot",
    group_by_length: bool = False,
) -> dict[str, Any]:
    """Train a base of ``family`` from scratch on ``shapes/train`` and save it to ``out`` (see the module docstring).

    Args:
        family: one of :data:`BASE_FAMILIES`.
        shapes: a directory written by ``make-shapes`` (``train/``, ``test/``, ``images/``).
        out: the output directory: checkpoint, processor, ``make_base.json``, ``eval/``.
        size: a key of :data:`SIZES`.
        steps: optimizer steps (batches of ``batch_size`` questions, all weights trainable).
        seed: initialisation and data-order seed.
        learning_rate: AdamW peak learning rate (linear warm-up for ``warmup_steps``, then cosine to 0).
        vision_warmup_steps: steps of :func:`warm_up_vision` first (0: none; a text LM has no tower).
        vision_freeze_steps: the vision tower and projector stay frozen for this many optimizer steps of the full
            training, while the language model learns to read them.
        threads: torch intra-op threads (default :func:`default_threads`).
        save_steps: steps between the checkpoints a re-run resumes from (under ``out/checkpoints``).
        eval_samples: test-split questions evaluated at the end (``latent eval --method cot`` with the blank-image
            control); ``None``: all of them, 0: none.
        resume: continue from the last checkpoint in ``out/checkpoints`` when there is one.
        command: the command line to record in ``make_base.json``.
        mix: what the base is trained on (:data:`MIXES`); with ``cot+direct`` the evaluation also asks the direct
            form (``latent eval --method direct``, with its blank-image control), with ``cot+direct+partial`` the
            partial form as well (``--method partial``).
        group_by_length: batch rows of similar length together (HF's ``LengthGroupedSampler`` on the characters of
            prompt + answer), so a direct row is not padded to a staged answer's ~300 tokens (a step ~40% cheaper).
            Off by default: the sampler sorts mega-batches of 50 batches, so training sees ~25 direct-only batches
            in a row, then staged ones sorted by question kind, and neither grouped run learned to read the image
            (llava deep, 3,500 steps, and mllama deep, 5,000 steps, ``--mix cot+direct``: 0% exact captions,
            blank-image accuracy equal to the real one) where the same mllama recipe in random order read 99.5% of
            the captions exactly after 1,800 steps.

    Returns:
        The summary written to ``out/make_base.json``.
    """
    import transformers
    from datasets import Dataset
    from latent_core.collate import SupervisedCollator
    from latent_core.trainer import LatentTrainer, LatentTrainingArguments

    shapes, out = Path(shapes), Path(out)
    _check_shapes(shapes)
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    transformers.set_seed(seed)
    model, processor = build_base(family, size, seed)
    rows = shapes_rows(shapes / "train" / "llava_cot.jsonl", images=family != "causal_lm", mix=mix)
    if group_by_length:
        rows = [{**row, "length": len(row["prompt"]) + len(row["answer"])} for row in rows]
    checkpoints = out / "checkpoints"
    args = LatentTrainingArguments(
        output_dir=str(checkpoints),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        logging_steps=max(1, min(25, steps // 10)),
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not show_progress,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        length_column_name="length",
    )
    start = time.perf_counter()
    checkpoint = _last_checkpoint(checkpoints) if resume else None
    vision = family != "causal_lm"
    warmup_losses: list[float] = []
    if vision and vision_warmup_steps and checkpoint is None:  # a checkpoint holds the warmed-up tower already
        warmup_losses = warm_up_vision(model, processor, family, shapes, vision_warmup_steps, batch_size,
                                       learning_rate, seed)  # fmt: skip
    info = {"method": "make-base", "family": family, "size": size, "seed": seed, "shapes": str(shapes), "mix": mix}
    callbacks = [_FreezeVision(model, vision_freeze_steps).callback()] if vision and vision_freeze_steps else []
    trainer = LatentTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=SupervisedCollator(processor, image_root=shapes),
        processing_class=processor,
        stage_info=info,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - start
    trainer.save_model(str(out))
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; make_base.json records the settings
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(checkpoints, ignore_errors=True)

    summary: dict[str, Any] = {
        "command": command,
        "family": family,
        "model_class": type(model).__name__,
        "size": size,
        "dims": asdict(SIZES[size]),
        "params": sum(p.numel() for p in model.parameters()),
        "image_px": IMAGE_PX,
        "seed": seed,
        "shapes": str(shapes),
        "shapes_args": shapes_args(shapes),
        "mix": mix,
        "group_by_length": group_by_length,
        "train_questions": sum("#" not in r["id"] for r in rows),
        "train_rows": len(rows),
        "steps": trainer.state.global_step,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "threads": threads,
        "vision_warmup_steps": vision_warmup_steps if vision else 0,
        "vision_warmup_loss": [warmup_losses[0], warmup_losses[-1]] if warmup_losses else None,
        "vision_freeze_steps": vision_freeze_steps if vision else 0,
        "train_seconds": round(train_seconds, 1),
        "resumed_from": checkpoint,
        "train_loss": result.training_loss,
        "loss_curve": losses,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if eval_samples != 0:
        summary["eval"] = evaluate_base(out, shapes, limit=eval_samples, batch_size=eval_batch_size,
                                        show_progress=show_progress)  # fmt: skip
        for form in ("direct", "partial"):
            if form in mix:
                summary[f"eval_{form}"] = evaluate_base(out, shapes, limit=eval_samples, batch_size=eval_batch_size,
                                                        show_progress=show_progress, method=form)  # fmt: skip
    (out / MAKE_BASE_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(base_readme(summary), encoding="utf-8")
    return summary


_MIX_TEXT = {
    "cot": "the full staged-CoT answers",
    "cot+direct": "each question twice: its staged-CoT answer, and asked directly with its conclusion alone",
    "cot+direct+partial": "each question three times: its staged-CoT answer, asked directly with its conclusion "
    "alone, and asked for short reasoning with its short partial answer (the reasoning alone, a counting scan cut to "
    "one running count per row)",
}


def _forms() -> dict[str, tuple[str, str]]:
    """The other forms a mixed base is asked in: ``{form: (heading, its instruction line)}``."""
    from latent_core.prompts import DIRECT_INSTRUCTION, PARTIAL_INSTRUCTION

    return {
        "direct": ("Asked directly", f"the prompt + '{DIRECT_INSTRUCTION}', the answer alone"),
        "partial": (
            "Asked for short reasoning",
            f"the prompt + '{PARTIAL_INSTRUCTION}', the answer read from `<CONCLUSION>`",
        ),  # fmt: skip
    }


def base_readme(summary: dict[str, Any]) -> str:
    """The README of a made base: what it is, the command and seed that made it, and its evaluation."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"# {summary['family']} base ({summary['size']}): {summary['model_class']}, {summary['params']:,} parameters",
        "",
        "Trained from scratch on the synthetic shapes task by `latent make-base` (every weight trainable). Load it "
        "with `latent_core.load_model(path)` / `load_processor(path)` or pass the path to any method's `--model`.",
        "",
        f"- command: `{summary['command']}`",
        f"- shapes data: `make_shapes({', '.join(f'{k}={v!r}' for k, v in summary['shapes_args'].items())})` "
        f"({summary['train_questions']} train questions)",
        f"- trained on: {_MIX_TEXT[summary.get('mix', 'cot')]}",
        f"- dims: {summary['dims']}; processor input {summary['image_px']} px",
        f"- {summary['steps']} steps of batch {summary['batch_size']}, lr {summary['learning_rate']}, vision warm-up "
        f"{summary['vision_warmup_steps']} steps, vision frozen for {summary['vision_freeze_steps']} steps; "
        f"{summary['train_seconds']:.0f} s on {summary['threads']} threads (torch {summary['torch']}, transformers "
        f"{summary['transformers']})",
    ]
    ev = summary.get("eval")
    for form, (heading, how) in _forms().items():
        other = summary.get(f"eval_{form}")
        if not other:
            continue
        lines += [
            "",
            f"{heading} ({other['n']} test questions, `latent eval --method {form}`: {how}):",
            "",
            "| accuracy | blank images | majority baseline | truncated | unanswered | tokens |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {pct(other['accuracy'])} | {pct(other['blank_accuracy'])} | {pct(other['majority_baseline'])} | "
            f"{other['truncated']} | {other['unanswered']} | {other['mean_generated_tokens']:.1f} |",
            "",
            "Per question kind: "
            + ", ".join(
                f"{k} {pct(v)} (blank {pct(other['blank_accuracy_per_kind'].get(k))})"
                for k, v in other["accuracy_per_kind"].items()
            ),  # fmt: skip
        ]
    if ev:
        lines += [
            "",
            f"Test split ({ev['n']} questions, `latent eval --method cot`, greedy, answer read from `<CONCLUSION>`):",
            "",
            "| accuracy | blank images | majority baseline | exact captions | truncated | unanswered | tokens |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {pct(ev['accuracy'])} | {pct(ev['blank_accuracy'])} | {pct(ev['majority_baseline'])} | "
            f"{pct(ev['exact_captions'])} | {ev['truncated']} | {ev['unanswered']} | "
            f"{ev['mean_generated_tokens']:.1f} |",
            "",
            "Per question kind: "
            + ", ".join(
                f"{k} {pct(v)} (blank {pct(ev['blank_accuracy_per_kind'].get(k))})"
                for k, v in ev["accuracy_per_kind"].items()
            ),  # fmt: skip
        ]
    return "\n".join(lines) + "\n"


def evaluate_base(
    model_dir: str | Path,
    shapes: str | Path,
    limit: int | None = None,
    batch_size: int = 50,
    max_new_tokens: int | None = None,
    show_progress: bool = False,
    method: str = "cot",
) -> dict[str, Any]:
    """``latent eval --method cot`` (or ``direct``, ``partial``) of a base on ``shapes/test/llava_cot.jsonl`` with
    the blank-image control, into ``model_dir/eval`` (``eval/<method>``): accuracy, per question kind, majority
    baseline, blank-image accuracy, exact captions (CoT only). ``max_new_tokens``: default 512 for CoT, the
    method's own otherwise."""
    from latent_core.readers import parse_cot_stages

    from latent_apps.eval.runner import read_samples_jsonl, run_eval

    model_dir, shapes = Path(model_dir), Path(shapes)
    bench = shapes / "test" / "llava_cot.jsonl"
    out = model_dir / "eval" if method == "cot" else model_dir / "eval" / method
    if max_new_tokens is None and method == "cot":
        max_new_tokens = 512
    summary = run_eval(
        str(model_dir), method, [bench], out, batch_size=batch_size, max_new_tokens=max_new_tokens, resume=False,
        limit=limit, blank=True, show_progress=show_progress,
    )["benches"][bench.stem]  # fmt: skip
    exact: list[bool] = []
    if method == "cot":
        gold = {r["id"]: parse_cot_stages(r["conversations"][1]["value"])["caption"]
                for r in read_samples_jsonl(bench)}  # fmt: skip
        records = read_samples_jsonl(out / bench.stem / "samples.jsonl")
        exact = [parse_cot_stages(r["prediction"]).get("caption") == gold[r["id"]] for r in records]
    blank = summary["blank"]
    return {
        "method": method,
        "n": summary["n"],
        "accuracy": summary["accuracy"],
        "accuracy_per_kind": {k: v["accuracy"] for k, v in summary["accuracy_per_category"].items()},
        "majority_baseline": summary["majority_baseline"]["accuracy"],
        "blank_accuracy": blank["accuracy"],
        "blank_accuracy_per_kind": {k: v["accuracy"] for k, v in blank["accuracy_per_category"].items()},
        "exact_captions": sum(exact) / len(exact) if exact else None,
        "truncated": summary["n_truncated"],
        "unanswered": summary["n_unanswered"],
        "mean_generated_tokens": summary["mean_generated_tokens"],
        "mean_reasoning_tokens": summary["mean_reasoning_tokens"],
    }
