"""LaRe's four training stages (Appendix A; METHODS.md section 3): ``uv run lare train --stage 1|2|3|4``.

Each stage starts from the previous one in the run directory (stage 1 from the ``lare init`` checkpoint) and trains
the groups of :data:`lare.model.STAGE_GROUPS`: I the projector with next-token prediction; II the extractor and the
U-Net with the latent losses, vision and LLM frozen; III (instruction tuning) and IV (reasoning fine-tuning) all but
the vision tower. A stage is a full-weight stage of :class:`latent_core.LatentTrainer` (resumable after a kill,
DeepSpeed by name): ``stage_weights.safetensors`` holds the trained weights of the llava model (the frozen ones stay
with the base named in ``latent_stage.json``, and :func:`latent_core.load_stage` re-applies the earlier stages), and
next to it ``lare_extractor.safetensors``, ``lare_reconstructor.safetensors`` (the U-Net and the latents'
projection) and ``lare_config.json``; :func:`lare.model.load_lare` loads a stage like a checkpoint.
``lare_train.json`` holds the summary and every loss curve by name, ``lare_train.png`` the curves.
``lare_reconstructor.json`` holds the U-Net's config, so a later stage rebuilds the same U-Net (the paper's, or the
smaller one ``reproduce lare`` uses at shapes scale).

A config with ``num_latents = 0`` trains the no-latent SFT control: the same sequence without latents
(``[V, X_q, <bot>, <eot>, answer]``), NTP only; it has no stage II (nothing of it would train), so its stage III
starts from stage I (``start``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lare.config import LareTrainConfig

__all__ = [
    "RECONSTRUCTOR_CONFIG",
    "RECONSTRUCTOR_WEIGHTS",
    "STAGE_BATCH",
    "STAGE_LEARNING_RATE",
    "stage_dir",
    "train_stage",
]

RECONSTRUCTOR_WEIGHTS = "lare_reconstructor.safetensors"
RECONSTRUCTOR_CONFIG = "lare_reconstructor.json"
STAGE_BATCH = {1: 256, 2: 128, 3: 128, 4: 128}
"""Appendix A: global batch 256 in stage I, 128 after."""
STAGE_LEARNING_RATE = {1: 1e-3, 2: 2e-5, 3: 2e-5, 4: 2e-5}
"""Lost (**choice**): LLaVA-1.5's rates, 1e-3 for the projector alone, 2e-5 after."""


def stage_dir(run_dir: str | Path, stage: int) -> Path:
    return Path(run_dir) / f"stage-{stage}"


def train_stage(
    config: LareTrainConfig,
    stage: int,
    rows: list[dict[str, Any]],
    base: str | Path,
    run_dir: str | Path,
    *,
    vae: Any = None,
    reconstructor: Any = None,
    start: str | Path | None = None,
) -> dict[str, Any]:
    """Train one stage on reasoning ``rows`` (:func:`latent_core.read_reasoning` records) and save it in
    ``<run_dir>/stage-<stage>``; returns the summary. ``vae``: an ``AutoencoderKL`` or its id / path (needed when
    L_img is on in stages 2-4); ``reconstructor``: a :class:`lare.losses.Reconstructor` to start from (default: the
    previous stage's, else the paper's U-Net, fresh); ``start``: the stage directory to start from instead of the
    previous stage (the no-latent control's stage III starts from its stage I)."""
    import torch
    from latent_core.hub import load_pretrained, load_tensors
    from latent_core.trainer import LatentTrainer, StageError

    from lare.data import LareCollator
    from lare.losses import Reconstructor, unet_config
    from lare.model import EXTRACTOR_WEIGHTS, LareForTraining, load_lare

    if stage not in (1, 2, 3, 4):
        raise ValueError(f"LaRe has stages 1-4 (Appendix A), got {stage}")
    if not rows:
        raise ValueError("no reasoning rows to train on")
    previous = Path(start) if start is not None else stage_dir(run_dir, stage - 1) if stage > 1 else None
    if previous is not None and not (previous / EXTRACTOR_WEIGHTS).is_file():
        hint = f"run stage {stage - 1}" if start is None else "--start must be a finished stage"
        raise StageError(f"stage {stage} starts from {previous}, which is not a finished stage: {hint}")
    source = previous if previous is not None else Path(base).resolve()
    # bf16: the frozen parts stay in bf16, LatentTrainer keeps fp32 master copies of what trains (Appendix A: bf16).
    dtype = torch.bfloat16 if config.bf16 else None
    model, processor = load_lare(source, device="cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)
    if model.config.num_latents == 0 and stage == 2:
        raise ValueError("with num_latents = 0 (the no-latent control) stage 2 has nothing to train: go to stage 3")
    terms = tuple(
        term
        for term, on in (
            ("align", config.align_text_weight > 0 or config.align_visual_weight > 0),
            ("img", config.img_weight > 0),
            ("text", config.text_weight > 0),
        )
        if on and stage > 1 and model.config.num_latents > 0
    )
    if "img" in terms:
        if vae is None:
            raise ValueError("L_img needs a KL VAE (--vae id or path), or switch it off with --img-weight 0")
        if isinstance(vae, str | Path):
            from diffusers import AutoencoderKL

            vae = load_pretrained(AutoencoderKL.from_pretrained, str(vae))
        vae = vae.to(model.device)
        if reconstructor is None:
            from diffusers import UNet2DConditionModel

            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            saved = previous / RECONSTRUCTOR_CONFIG if previous is not None else None
            if saved is not None and saved.is_file():  # the U-Net the earlier stage trained
                unet = UNet2DConditionModel.from_config(json.loads(saved.read_text()))
            else:
                unet = UNet2DConditionModel(**unet_config(config.crop_size // factor, vae.config.latent_channels))
            reconstructor = Reconstructor(model.vlm.config.get_text_config().hidden_size, unet)
        if previous is not None and (previous / RECONSTRUCTOR_WEIGHTS).is_file():
            reconstructor.load_state_dict(load_tensors(previous / RECONSTRUCTOR_WEIGHTS))
    scheduler = None
    if "img" in terms:  # diffusers is imported only when L_img is on
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    image = getattr(processor, "image_processor", None)
    training = LareForTraining(
        model, reconstructor if "img" in terms else None, vae if "img" in terms else None, scheduler, stage,
        tuple(getattr(image, "image_mean", (0.48145466, 0.4578275, 0.40821073))),
        tuple(getattr(image, "image_std", (0.26862954, 0.26130258, 0.27577711))),
        config.crop_size, config.temperature, terms,
    ).to(model.device)  # fmt: skip
    lare_config = model.config
    trainer = LatentTrainer(
        model=training,
        args=config,
        train_dataset=rows,
        data_collator=LareCollator(processor, config.text_prefix),
        processing_class=processor,
        stage_info={
            "method": "lare",
            "stage": stage,
            "tokens": [lare_config.bot_token, lare_config.eot_token],
            "terms": list(terms),
        },  # fmt: skip
    )
    out = stage_dir(run_dir, stage)
    summary = trainer.train_and_save(out, "lare_train.json", samples=len(rows))
    if trainer.args.should_save:
        _save_parts(training, out)
        history = trainer.state.log_history
        names = ("loss", "ntp_loss", "align_text_loss", "align_visual_loss", "img_loss", "text_loss")
        summary["loss_curves"] = {name: [h[name] for h in history if name in h] for name in names}
        (out / "lare_train.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        _plot(summary["loss_curves"], out / "lare_train.png", stage)
    return summary


def _save_parts(training: Any, out: Path) -> None:
    """The whole extractor, the reconstructor and the LaRe config next to the trainer's stage files."""
    from safetensors.torch import save_file

    from lare.model import EXTRACTOR_WEIGHTS

    def tensors(module: Any) -> dict[str, Any]:
        return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}

    save_file(tensors(training.lare.extractor), str(out / EXTRACTOR_WEIGHTS))
    if training.reconstructor is not None:
        save_file(tensors(training.reconstructor), str(out / RECONSTRUCTOR_WEIGHTS))
        config = {k: v for k, v in dict(training.reconstructor.unet.config).items() if not k.startswith("_")}
        (out / RECONSTRUCTOR_CONFIG).write_text(json.dumps(config, indent=2, default=list) + "\n")
    training.lare.config.save(out)


def _plot(curves: dict[str, list[float]], path: Path, stage: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5, 3.2))
    for name, values in curves.items():
        if values:
            axis.plot(range(1, len(values) + 1), values, label=name)
    axis.set_yscale("log")
    axis.set_xlabel("logged step")
    axis.set_title(f"LaRe stage {stage}")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
