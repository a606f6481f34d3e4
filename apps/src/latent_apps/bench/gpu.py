"""`bench gpu`: one training step of each method, and LaViT's teacher pass, on random-weight models of the papers'
real sizes in bf16 on one GPU: does each fit, how much memory does it take, how fast is it.

Every case builds its model on the device from the published ``config.json`` (``--scale real``:
:func:`latent_core.configs.published_config`) or from the tiny zoo's config of the same class (``--scale tiny``:
:mod:`latent_core.testing`, for a CPU dry run), runs the method's own code on it, and frees it before the next case:

- ``heima-stage``: a Heima progressive stage (stage 1: the summary replaced by its thinking token) on
  Llama-3.2-11B-Vision (mllama), prepared by :func:`heima.model.prepare_model` (LoRA r=16 on every language and
  cross-attention layer and ``lm_head``, the thinking-token rows trainable) and trained by
  :class:`latent_core.LatentTrainer` with :class:`heima.config.HeimaConfig`'s defaults (activation checkpointing,
  AdamW, grad clip 1.0), batch 1: one 560 px image (one tile, padded to four) and a CoT-length answer (~512 tokens)
  through :class:`latent_core.collate.SupervisedCollator`;
- ``lavit-student``: LaViT's K=4 continuous step (:func:`lavit.trainer.prepare_student`: the LLM fully trained, the
  vision tower frozen; :class:`lavit.model.LavitStudent`'s forward) on Qwen2.5-VL-3B with the gate on (gamma of the
  first steps of Eq. 5) and the attention recorder feeding L_traj, batch 1: a 1120 x 896 image = 1,003,520 pixels
  (Table A1's max_pixels) = 1,280 merged image tokens, teacher targets of the 32B teacher's shapes (V_sem as wide as
  its hidden size, A_traj's Top-8 on the student's grid) through :class:`lavit.data.LavitCollator`;
- ``lare-step``: LaRe's stage III (projector, LLM, extractor and L_img's U-Net train; :class:`lare.LareForTraining`)
  with T=4 refocusing iterations on CLIP ViT-L/14 (224 px: 256 image tokens) + Qwen2.5-1.5B, batch 2, every loss
  term: L_align, L_img (the paper's U-Net on a random KL-f16 VAE's latents of 128 px crops) and L_text;
- ``lavit-teacher``: :func:`lavit.teacher.teacher_pass` (build-lavit-15k's fused pass: greedy answer on the KV cache,
  attention rows recorded, V_sem at prefill) over 2 samples on Qwen2.5-VL-7B, 1,280 image tokens and 64 new tokens
  each.

Each case prints one JSON line as soon as it ends (``--json``): ``case, device, scale, dtype, model, params,
trainable, batch, tokens`` (language-model positions of one step, every sample: prompt with its image tokens,
latents, answer; mllama's image enters through cross-attention and is not counted), ``step_time_s`` (median of
``--steps`` steps after one warm-up step: forward, backward, clipping and the optimizer as the Trainer runs them;
for the teacher, one whole pass), ``tokens_per_s``, ``peak_memory_gib`` (``torch.cuda.max_memory_allocated`` from
before the model is built: weights, optimizer state and activations; ``null`` on CPU), ``build_memory_gib`` (after
the model is built), ``build_s``, ``loss`` / ``loss_terms`` / ``grad_norm`` (the Trainer's log of the last step), and
``error`` when the case failed (the others still run). The last line is the summary record ``{"bench": "gpu",
"cases": [...], "failed": [...]}``.

Stand-ins (nothing can be downloaded): the tokenizer is the zoo's byte-level BPE with the family's special tokens
(:func:`latent_core.testing.tiny_tokenizer`); its ids are a subset of the real vocabulary, the config's
special-token ids (image, video, vision start / end) are pointed at it, and embedding and ``lm_head`` keep the
published vocabulary size, so the compute is the real model's while the text is not real text; token counts are
therefore set explicitly. The image processors are the families' real classes at the published sizes. The weights
are random (seed 0).
"""

from __future__ import annotations

import copy
import gc
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from latent_core.cli import UserError
from transformers import TrainerCallback

from latent_apps.bench.common import bench_device, ratio, report, sync, timed

__all__ = ["CASES", "SCALES", "run"]

SCALES = ("real", "tiny")
WARMUP_STEPS = 1
"""Steps run before the timed ones (CUDA kernels chosen, allocator warmed)."""


@dataclass(frozen=True)
class Sizes:
    """The inputs of every case at one scale (the models' sizes come from their configs)."""

    heima_answer_tokens: int  # a CoT answer of LLaVA-CoT-100k: summary, caption, reasoning, conclusion
    lavit_image: tuple[int, int]  # (width, height) in pixels
    lavit_answer_tokens: int
    lare_image: int
    lare_reasoning_tokens: int  # what L_align pools (LareCollator's max_reasoning_tokens: 256)
    lare_answer_tokens: int
    teacher_image: tuple[int, int]
    teacher_new_tokens: int  # TeacherOptions' default max_new_tokens


SIZES = {
    # 1120 x 896 = 1,003,520 pixels = Table A1's max_pixels: a 40 x 32 merged grid, 1,280 image tokens.
    "real": Sizes(512, (1120, 896), 32, 224, 256, 32, (1120, 896), 64),
    "tiny": Sizes(48, (56, 56), 8, 64, 24, 8, (56, 56), 8),
}

MODELS = {
    "heima-stage": "llama-3.2-11b-vision",
    "lavit-student": "qwen2.5-vl-3b",
    "lare-step": "clip-vit-l-14 + qwen2.5-1.5b",
    "lavit-teacher": "qwen2.5-vl-7b",
}
"""The published models each case takes its real shapes from (latent_core.hub aliases)."""
LAVIT_TEACHER = "qwen2.5-vl-32b"
"""The teacher whose hidden size is V_sem's width in the student's targets (METHODS.md section 2: 5120)."""
TINY_TEACHER_HIDDEN = 96

# Where each family's special tokens are in its config (the stand-in tokenizer's ids are written there).
_SPECIAL_TOKENS = {
    "mllama": {"image_token_id": "<|image|>"},
    "llava": {"image_token_id": "<image>"},
    "qwen2_5_vl": {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    },
}
_QUESTION = "How many red circles are there? Is there a yellow star in the top left corner of the picture?"
_FILLER = (
    "There is a red circle at row 1 column 2. There is a blue square at row 2 column 1. So the count is 2, and the "
    "answer is yes. I will look at the shape. So there are 3 yellow shapes and 2 blue shapes. "
)


# ----------------------------------------------------------------------------------------------- building blocks


def _dtype(where: torch.device) -> torch.dtype:
    """bf16 on CUDA (the papers' training precision), fp32 on CPU (the dry run)."""
    return torch.bfloat16 if where.type == "cuda" else torch.float32


def _published(alias: str) -> Any:
    """A copy of the published ``config.json`` of ``alias`` as a transformers config."""
    from latent_core.configs import published_config
    from transformers import AutoConfig

    config = published_config(alias)
    if isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    return copy.deepcopy(config)


def _zoo(family: str) -> tuple[Any, Any]:
    """The tiny zoo's config (a copy) and a fresh processor of ``family``: the tiny scale's shapes and the stand-in
    tokenizer of both scales."""
    from latent_core.testing import tiny_model

    model, processor = tiny_model(family)
    return copy.deepcopy(model.config), processor


def _use_stand_in_ids(config: Any, family: str, tokenizer: Any) -> None:
    """Point ``config``'s special-token ids at the stand-in tokenizer's (see the module docstring)."""
    for attribute, token in _SPECIAL_TOKENS[family].items():
        setattr(config, attribute, tokenizer.convert_tokens_to_ids(token))


def _parts(family: str, alias: str, scale: str) -> tuple[Any, Any]:
    """``(config, processor)`` of a case: the published config with a processor of the family's class at its image
    size (real), or the zoo's (tiny)."""
    config, processor = _zoo(family)
    if scale == "real":
        config = _published(alias)
        vision = config.vision_config
        if family == "mllama":
            from transformers import MllamaImageProcessor

            size = {"height": vision.image_size, "width": vision.image_size}
            processor.image_processor = MllamaImageProcessor(size=size, max_image_tiles=vision.max_num_tiles)
        elif family == "qwen2_5_vl":
            from transformers import Qwen2VLImageProcessor

            processor.image_processor = Qwen2VLImageProcessor(
                patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                temporal_patch_size=vision.temporal_patch_size,
            )  # fmt: skip
    _use_stand_in_ids(config, family, processor.tokenizer)
    return config, processor


def _build(model_class: type, config: Any, where: torch.device) -> Any:
    """A random ``model_class`` of ``config`` built directly on ``where`` in :func:`_dtype` (seed 0): no CPU copy."""
    torch.manual_seed(0)
    with torch.device(where):
        return model_class._from_config(config, dtype=_dtype(where))


def _text(tokenizer: Any, n_tokens: int, skip: int = 0) -> str:
    """About ``n_tokens`` tokens of shapes-task prose (the stand-in tokenizer's ids), from its ``skip``-th token."""
    ids = tokenizer(_FILLER * (n_tokens // 8 + 2), add_special_tokens=False)["input_ids"][skip : skip + n_tokens]
    return tokenizer.decode(ids).strip()


def _image(width: int, height: int, seed: int = 0):
    """A random RGB PIL image of ``width`` x ``height`` pixels."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def _count(module: torch.nn.Module) -> dict[str, int]:
    params = list({id(p): p for p in module.parameters()}.values())
    return {"params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def _gib(nbytes: int) -> float:
    return round(nbytes / 2**30, 3)


class _StepClock(TrainerCallback):
    """Wall seconds of every optimizer step (forward, backward, clipping, optimizer; CUDA waited for)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.seconds.append(time.perf_counter() - self._start)


def _args(config_class: type, out: str, where: torch.device, batch: int, steps: int, **fields: Any) -> Any:
    """A method's training arguments (its paper defaults) for ``WARMUP_STEPS + steps`` steps of ``batch`` on
    ``where``: bf16 mixed precision on CUDA, a log every step, nothing saved, nothing printed."""
    return config_class(
        output_dir=out, max_steps=WARMUP_STEPS + steps, per_device_train_batch_size=batch, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False,
        use_cpu=where.type == "cpu", bf16=where.type == "cuda", seed=0, remove_unused_columns=False, **fields,
    )  # fmt: skip


def _train(
    model: torch.nn.Module, args: Any, rows: list[dict[str, Any]], collator: Any, schedules: Sequence[Callable] = ()
) -> dict[str, Any]:
    """Train ``model`` with :class:`latent_core.LatentTrainer` on ``rows`` (repeated for every step); the step
    times and the last step's logged losses."""
    from latent_core.trainer import LatentTrainer
    from transformers import PrinterCallback

    clock = _StepClock()
    needed = args.per_device_train_batch_size * args.max_steps
    trainer = LatentTrainer(
        model=model, args=args, train_dataset=rows * (needed // len(rows) + 1), data_collator=collator,
        callbacks=[clock], step_schedules=list(schedules),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the logs would go to stdout, where the JSON lines are
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    return {
        **_count(model),
        "step_time_s": statistics.median(clock.seconds[WARMUP_STEPS:]),
        "steps": len(clock.seconds) - WARMUP_STEPS,
        "loss": last["loss"],
        "loss_terms": {k.removesuffix("_loss"): v for k, v in last.items() if k.endswith("_loss")},
        "grad_norm": last.get("grad_norm"),
    }


# ---------------------------------------------------------------------------------------------------------- cases


def heima_stage(where: torch.device, scale: str, steps: int) -> dict[str, Any]:
    """Heima stage 1 on Llama-3.2-11B-Vision with the paper's LoRA: one image, a CoT-length answer (see the module
    docstring)."""
    from heima.config import STAGES, HeimaConfig, thinking_token
    from heima.data import replace_stages
    from heima.model import prepare_model
    from latent_core.collate import SupervisedCollator
    from transformers import MllamaForConditionalGeneration

    sizes = SIZES[scale]
    config, processor = _parts("mllama", MODELS["heima-stage"], scale)
    start = time.perf_counter()
    base = _build(MllamaForConditionalGeneration, config, where)
    tokens = [thinking_token(stage) for stage in STAGES]
    tokenizer = processor.tokenizer
    n = sizes.heima_answer_tokens
    cot = (
        f"<SUMMARY>{_text(tokenizer, n // 8)}</SUMMARY>\n\n<CAPTION>{_text(tokenizer, 3 * n // 8)}</CAPTION>\n\n"
        f"<REASONING>{_text(tokenizer, 5 * n // 8)}</REASONING>\n\n<CONCLUSION>B</CONCLUSION>"
    )
    side = config.vision_config.image_size
    row = {
        "id": "bench",
        "prompt": _QUESTION,
        "answer": replace_stages(cot, {STAGES[0]: [tokens[0]]}),  # stage 1: the summary is its thinking token
        "image": _image(side, side),
    }
    with tempfile.TemporaryDirectory() as out:
        args = _args(HeimaConfig, out, where, 1, steps, run_dir=out)
        model = prepare_model(args, base, processor, tokens)  # the thinking tokens join the tokenizer here
        built = {"build_s": time.perf_counter() - start, "build_memory_gib": _allocated(where)}
        collator = SupervisedCollator(processor)
        batch = collator([row])
        result = _train(model, args, [row], collator)
    return {
        **built,
        **result,
        "batch": 1,
        "tokens": int(batch["attention_mask"].sum()),
        "answer_tokens": int((batch["labels"] != -100).sum()),
        "image_tiles": int(batch["aspect_ratio_mask"].sum()),
    }


def lavit_student(where: torch.device, scale: str, steps: int) -> dict[str, Any]:
    """LaViT's K=4 continuous step on Qwen2.5-VL-3B with the gate and the recorder, ~1,280 image tokens (see the
    module docstring)."""
    from latent_core.attention import gate_schedule
    from lavit.config import LavitConfig
    from lavit.data import LavitCollator
    from lavit.teacher import merged_grid
    from lavit.trainer import prepare_student
    from transformers import Qwen2_5_VLForConditionalGeneration

    sizes = SIZES[scale]
    config, processor = _parts("qwen2_5_vl", MODELS["lavit-student"], scale)
    teacher_hidden = _published(LAVIT_TEACHER).get_text_config().hidden_size if scale == "real" else TINY_TEACHER_HIDDEN
    start = time.perf_counter()
    base = _build(Qwen2_5_VLForConditionalGeneration, config, where)
    # Tiny: the zoo processor's own pixel bounds (Table A1's would blow a 56 px image up to 448 px).
    bounds = {} if scale == "real" else {"min_pixels": None, "max_pixels": None}
    with tempfile.TemporaryDirectory() as out:
        args = _args(LavitConfig, out, where, 1, steps, **bounds)
        inputs = args.inputs.apply(processor)
        student = prepare_student(args, base, processor, teacher_hidden)
        built = {"build_s": time.perf_counter() - start, "build_memory_gib": _allocated(where)}
        image = _image(*sizes.lavit_image)
        image_processor = processor.image_processor
        grid_thw = image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        _, h, w = merged_grid(grid_thw, image_processor.merge_size)
        g = torch.Generator().manual_seed(0)
        top = torch.randperm(h * w, generator=g)[:8]
        target = torch.zeros(h * w)
        target[top] = torch.rand(len(top), generator=g) + 0.1
        row = {
            "id": "bench",
            "image": image,
            "question": _QUESTION,
            "answer": _text(processor.tokenizer, sizes.lavit_answer_tokens),
            "traj_target": target / target.sum(),  # A_traj's Top-8 renormalised, on the teacher's (= student's) grid
            "traj_grid": (h, w),
            "vsem_mean": torch.randn(teacher_hidden, generator=g),
        }
        collator = LavitCollator(processor, system=inputs.system_prompt)
        batch = collator([row])

        def gate(step: int) -> None:  # Eq. 5's gamma(t), as lavit.trainer.train_student sets it
            student.gamma = gate_schedule(step, args.gate_warmup, args.gate_eps, args.gate)

        result = _train(student, args, [row], collator, [gate])
    return {
        **built,
        **result,
        "batch": 1,
        "tokens": int(batch["attention_mask"].sum()) + student.k + batch["answer_ids"].numel(),
        "image_tokens": h * w,
        "num_latents": student.k,
        "gamma": student.gamma,
    }


def _lare_parts(scale: str) -> tuple[Any, Any]:
    """The llava config LaRe composes (CLIP ViT-L/14 + MLP projector + Qwen2.5-1.5B, as :func:`lare.compose` does)
    and its processor; tiny: the zoo's llava (a 16 x 16 grid too)."""
    config, processor = _zoo("llava")
    if scale == "real":
        from lare.refocus import grid_side
        from transformers import CLIPImageProcessor, LlavaConfig

        vision = _published("clip-vit-l-14")
        vision = getattr(vision, "vision_config", vision)  # a full CLIP checkpoint's config: its vision half
        text = _published("qwen2.5-1.5b")
        grid = grid_side((vision.image_size // vision.patch_size) ** 2)
        config = LlavaConfig(
            vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_select_strategy="default",
            vision_feature_layer=-2, image_seq_length=grid * grid, projector_hidden_act="gelu",
            tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        )  # fmt: skip
        side = vision.image_size
        processor.image_processor = CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
        processor.patch_size = vision.patch_size
    _use_stand_in_ids(config, "llava", processor.tokenizer)
    return config, processor


def lare_step(where: torch.device, scale: str, steps: int) -> dict[str, Any]:
    """LaRe's stage III with T=4 refocusing iterations on CLIP-L + Qwen2.5-1.5B, every loss term, batch 2 (see the
    module docstring)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from lare.config import LareConfig, LareTrainConfig
    from lare.data import LareCollator
    from lare.extractor import Extractor
    from lare.losses import Reconstructor, unet_config
    from lare.model import LareForTraining, LareModel
    from lare.vae import small_unet_config, small_vae_config
    from latent_core.tokens import add_special_tokens
    from transformers import LlavaForConditionalGeneration

    sizes, batch_size = SIZES[scale], 2
    config, processor = _lare_parts(scale)
    # Real: Appendix B's extractor (2 layers, 12 heads, 1536 wide), the paper's U-Net, a KL-f16 VAE of LDM's width.
    lare_config = LareConfig() if scale == "real" else LareConfig(extractor_hidden=32, extractor_heads=4)
    vae_config = small_vae_config(latent_channels=16, width=128) if scale == "real" else small_vae_config(width=8)
    start = time.perf_counter()
    vlm = _build(LlavaForConditionalGeneration, config, where)
    bot, eot = add_special_tokens(vlm, processor, [lare_config.bot_token, lare_config.eot_token])
    with tempfile.TemporaryDirectory() as out:
        args = _args(LareTrainConfig, out, where, batch_size, steps)
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        latent = args.crop_size // factor, vae_config["latent_channels"]
        torch.manual_seed(0)
        with torch.device(where):
            extractor = Extractor.for_model(vlm, lare_config).to(_dtype(where))
            vae = AutoencoderKL(**vae_config)
            unet = UNet2DConditionModel(**(unet_config(*latent) if scale == "real" else small_unet_config(*latent)))
            reconstructor = Reconstructor(config.get_text_config().hidden_size, unet)
        # lare.trainer.train_stage's noise schedule (METHODS.md section 3: linear betas 1e-4 to 0.02, 1000 steps)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
        image_processor = processor.image_processor
        training = LareForTraining(
            LareModel(vlm, extractor, lare_config, bot, eot), reconstructor, vae, scheduler, 3,
            tuple(image_processor.image_mean), tuple(image_processor.image_std), args.crop_size, args.temperature,
            ("align", "img", "text"),
        ).to(where)  # fmt: skip
        built = {"build_s": time.perf_counter() - start, "build_memory_gib": _allocated(where)}
        tokenizer = processor.tokenizer
        rows = [  # distinct samples: L_align's in-batch negatives differ from the positives
            {
                "id": f"bench-{i}",
                "image": _image(sizes.lare_image, sizes.lare_image, seed=i),
                "question": _QUESTION,
                "reasoning": _text(tokenizer, sizes.lare_reasoning_tokens, skip=i),
                "answer": _text(tokenizer, sizes.lare_answer_tokens, skip=3 * i),
            }
            for i in range(batch_size)
        ]
        collator = LareCollator(processor, args.text_prefix)
        batch = collator(rows)
        result = _train(training, args, rows, collator)
    delimiters = 2  # <bot> and <eot>
    return {
        **built,
        **result,
        "batch": batch_size,
        "tokens": int(batch["attention_mask"].sum())
        + batch_size * (lare_config.num_latents + delimiters)
        + batch["answer_ids"].numel(),
        "image_tokens": int(config.image_seq_length),
        "num_latents": lare_config.num_latents,
    }


def lavit_teacher(where: torch.device, scale: str, steps: int) -> dict[str, Any]:
    """build-lavit-15k's fused teacher pass over 2 samples on Qwen2.5-VL-7B, ~1,280 image tokens each (see the module
    docstring)."""
    from latent_core.prompts import encode_chats, render_prompts
    from lavit.inputs import InputSettings
    from lavit.teacher import TeacherOptions, teacher_pass
    from transformers import Qwen2_5_VLForConditionalGeneration

    sizes, batch_size = SIZES[scale], 2
    config, processor = _parts("qwen2_5_vl", MODELS["lavit-teacher"], scale)
    start = time.perf_counter()
    model = _build(Qwen2_5_VLForConditionalGeneration, config, where).eval()
    model.generation_config.eos_token_id = None  # every answer runs to max_new_tokens: a fixed amount of work
    built = {"build_s": time.perf_counter() - start, "build_memory_gib": _allocated(where)}
    inputs = (InputSettings() if scale == "real" else InputSettings.own()).apply(processor)
    images = [_image(*sizes.teacher_image, seed=i) for i in range(batch_size)]
    questions = [_QUESTION] * batch_size
    options = TeacherOptions(max_new_tokens=sizes.teacher_new_tokens)

    def teacher() -> list[Any]:
        return teacher_pass(model, processor, images, questions, options, system=inputs.system_prompt)

    seconds, outputs = timed(teacher, repeats=steps, warmup=WARMUP_STEPS)
    chats = render_prompts(processor, questions, [1] * batch_size, system=inputs.system_prompt)
    prompt_tokens = int(encode_chats(processor, chats, [[image] for image in images])["attention_mask"].sum())
    new_tokens = sum(len(out.answer_ids) for out in outputs)
    finite = all(bool(out.scores.isfinite().all() and out.v_sem.float().isfinite().all()) for out in outputs)
    return {
        **built,
        "params": _count(model)["params"],
        "trainable": 0,  # inference
        "step_time_s": seconds,
        "steps": steps,
        "batch": batch_size,
        "tokens": prompt_tokens + new_tokens,
        "new_tokens_per_s": new_tokens / seconds,
        "image_tokens": int(outputs[0].scores.numel()),
        "finite_outputs": finite,
    }


CASES: dict[str, Callable[[torch.device, str, int], dict[str, Any]]] = {
    "heima-stage": heima_stage,
    "lavit-student": lavit_student,
    "lare-step": lare_step,
    "lavit-teacher": lavit_teacher,
}
"""Every case, in the order they run: name -> ``fn(device, scale, steps)`` returning its measurements."""


# ------------------------------------------------------------------------------------------------------- running


def _allocated(where: torch.device) -> float | None:
    return _gib(torch.cuda.memory_allocated(where)) if where.type == "cuda" else None


def _free(where: torch.device) -> None:
    gc.collect()
    if where.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(where)


def _run_case(name: str, where: torch.device, scale: str, steps: int) -> dict[str, Any]:
    """One case's record; a failure (out of memory, a bug that only shows at real size) is recorded as ``error``
    with its traceback on stderr, and the model is freed either way."""
    _free(where)
    record: dict[str, Any] = {
        "case": name,
        "device": str(where),
        "scale": scale,
        "dtype": str(_dtype(where)).removeprefix("torch."),
        "model": MODELS[name] if scale == "real" else "tiny zoo",
    }
    start = time.perf_counter()
    try:
        record |= CASES[name](where, scale, steps)
    except Exception as err:  # noqa: BLE001 - the other cases still run; the summary lists this one as failed
        traceback.print_exc()
        record["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
    record["wall_s"] = time.perf_counter() - start
    record["peak_memory_gib"] = _gib(torch.cuda.max_memory_allocated(where)) if where.type == "cuda" else None
    if "step_time_s" in record:
        record["tokens_per_s"] = ratio(record["tokens"], record["step_time_s"])
    _free(where)
    return record


def _check_real(where: torch.device) -> None:
    if where.type != "cuda":
        raise UserError(
            f"--scale real builds the published model sizes (the 11B mllama alone is 22 GB in bf16) and needs CUDA; "
            f"got --device {where}: run it on a GPU (--device cuda) or dry-run with --scale tiny"
        )
    try:
        from latent_core.configs import published_config  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"--scale real reads the published configs from latent_core.configs.published_config ({err}); "
            "this checkout lacks them: use --scale tiny"
        ) from None


def run(
    as_json: bool = False,
    device: str = "auto",
    scale: str = "real",
    cases: Sequence[str] | None = None,
    steps: int = 3,
) -> dict[str, Any]:
    """Run the cases (default: all of :data:`CASES`), print a table (with ``as_json`` one JSON line per case as it
    ends and the summary record as the last line); return the summary record.

    Raises:
        UserError: an unknown scale or case, ``--scale real`` without CUDA (before anything is allocated), or a
            CUDA device other than ``cuda:0`` (the Trainer's device; pick a GPU with ``CUDA_VISIBLE_DEVICES``).
    """
    if scale not in SCALES:
        raise UserError(f"--scale {scale!r}: choose real or tiny")
    names = list(cases or CASES)
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise UserError(f"--case {', '.join(unknown)}: choose from {', '.join(CASES)}")
    if steps < 1:
        raise UserError(f"--steps {steps}: at least one step is timed")
    where = bench_device(device)
    if where.type == "cuda" and (where.index or 0) != 0:
        raise UserError(f"--device {where}: the Trainer trains on cuda:0; choose the GPU with CUDA_VISIBLE_DEVICES")
    if where.type == "cuda":
        where = torch.device("cuda", 0)
    if scale == "real":
        _check_real(where)
    records = []
    for name in names:
        record = _run_case(name, where, scale, steps)
        records.append(record)
        if as_json:
            print(json.dumps(record, sort_keys=True), flush=True)
    failed = [r["case"] for r in records if "error" in r]
    summary = {"bench": "gpu", "device": str(where), "scale": scale, "cases": records, "failed": failed}
    table = []
    for r in records:
        if "error" in r:
            table.append((r["case"], f"failed: {r['error'][:70]}", "runs"))
            continue
        memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
        value = (
            f"{r['step_time_s']:.3f} s/step, {r['tokens_per_s']:.0f} tok/s, peak {memory}, "
            f"{_millions(r['params'])} params ({_millions(r['trainable'])} trained)"
        )
        table.append((r["case"], value, "runs"))
    report(f"gpu: {len(records)} cases at {scale} scale on {where}", table, summary, as_json)
    return summary
