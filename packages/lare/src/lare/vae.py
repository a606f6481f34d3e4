"""A KL VAE for L_img where no pretrained one can be loaded: ``uv run lare train-vae`` (METHODS.md section 3).

L_img encodes the window's image crop with a KL VAE of downsampling factor f = 16 (``AutoencoderKL``; the paper's
was pretrained, and :func:`lare.trainer.train_stage` loads any one by id or path with ``--vae``). On the synthetic
shapes task none exists, so this trains a small one of the same class from scratch on crops of the training images
- random squares of a quarter to the whole image, resized to ``crop_size`` like L_img's windows - with the usual
objective: reconstruction (mean squared error in [-1, 1]) plus a small KL term to the unit Gaussian (``kl_weight``,
**choice** 1e-4). It is saved with ``save_pretrained`` (safetensors), so ``--vae`` takes it like a Hub VAE.

:func:`small_unet_config` is the matching L_img U-Net at shapes scale: the paper's block layout (Down,
CrossAttnDown, CrossAttnDown, Down; head dim 64; :func:`lare.losses.unet_config`) at a quarter of its width with one
layer per block, since the paper's (96..512 channels, 3 layers per block) would dwarf a 351K-parameter VLM.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["VAE_SUMMARY", "small_unet_config", "small_vae_config", "train_vae"]

VAE_SUMMARY = "lare_vae.json"


def small_vae_config(latent_channels: int = 4, width: int = 16) -> dict[str, Any]:
    """``AutoencoderKL`` arguments with f = 16 (five levels, four downsamplings) and ``width`` channels at the top."""
    channels = (width, 2 * width, 2 * width, 4 * width, 4 * width)
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 5,
        up_block_types=("UpDecoderBlock2D",) * 5, block_out_channels=channels, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8,
    )  # fmt: skip


def small_unet_config(sample_size: int, in_channels: int, cross_attention_dim: int = 768) -> dict[str, Any]:
    """The paper's L_img U-Net (:func:`lare.losses.unet_config`) at a quarter of the width, one layer per block."""
    from lare.losses import unet_config

    config = unet_config(sample_size, in_channels, cross_attention_dim)
    channels = tuple(c // 4 for c in config["block_out_channels"])
    return {**config, "block_out_channels": channels, "layers_per_block": 1, "norm_num_groups": 8,
            "attention_head_dim": tuple(max(c // 64, 1) for c in channels)}  # fmt: skip


def _crops(images: Sequence[Any], count: int, size: int, rng: random.Random):
    import numpy as np
    import torch

    batch = []
    for _ in range(count):
        image = images[rng.randrange(len(images))]
        side = min(image.size)
        crop = rng.randint(max(side // 4, 1), side)
        left, top = rng.randint(0, image.size[0] - crop), rng.randint(0, image.size[1] - crop)
        piece = image.crop((left, top, left + crop, top + crop)).resize((size, size))
        batch.append(torch.from_numpy(np.asarray(piece, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(batch)


def train_vae(
    images: Sequence[Any],
    out: str | Path,
    *,
    steps: int = 400,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    crop_size: int = 128,
    kl_weight: float = 1e-4,
    width: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a small f = 16 ``AutoencoderKL`` on random crops of ``images`` (PIL, RGB) and save it in ``out``;
    returns the summary (also ``out/lare_vae.json``). A finished one (its summary present) is reused as it is; the
    training is a few minutes at most, so an interrupted one starts over."""
    import torch
    from diffusers import AutoencoderKL

    out = Path(out)
    if (out / VAE_SUMMARY).is_file():
        return json.loads((out / VAE_SUMMARY).read_text())
    if not images:
        raise ValueError("no images to train the VAE on")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = AutoencoderKL(**small_vae_config(width=width), sample_size=crop_size).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    curve = []
    for _ in range(steps):
        pixels = _crops(images, batch_size, crop_size, rng).to(device)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(reconstruction, pixels)
        loss = mse + kl_weight * posterior.kl().mean() / pixels[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(round(mse.item(), 5))
    vae.eval()
    with torch.no_grad():  # the latents' scale, so that vae.config.scaling_factor makes them unit-variance
        latents = vae.encode(_crops(images, 64, crop_size, random.Random(seed + 1)).to(device)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    out.mkdir(parents=True, exist_ok=True)
    vae.to("cpu").save_pretrained(out)
    summary = {
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "crop_size": crop_size,
        "kl_weight": kl_weight, "width": width, "images": len(images), "first_mse": curve[0], "last_mse": curve[-1],
        "mse_curve": curve[:: max(len(curve) // 50, 1)],
        "parameters": sum(p.numel() for p in vae.parameters()), "scaling_factor": vae.config.scaling_factor,
    }  # fmt: skip
    (out / VAE_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
