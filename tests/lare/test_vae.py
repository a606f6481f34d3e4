"""The shapes-scale KL VAE of L_img (`lare train-vae`, lare.vae) and its U-Net: f = 16, a saved checkpoint that
loads like a Hub VAE, a scaling factor that makes the latents unit-variance, reconstruction that improves, reuse of a
finished one, and the quarter-width U-Net running on the 4 x 4 latents of a 64 px crop."""

from __future__ import annotations

import json
import random

import pytest
import torch
from latent_core.testing import tiny_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_vae_saves_an_f16_autoencoder_with_unit_variance_latents(tmp_path):
    from diffusers import AutoencoderKL
    from lare.vae import _crops, train_vae

    images = [tiny_image(i, 48).convert("RGB") for i in range(6)]
    summary = train_vae(images, tmp_path / "vae", steps=30, batch_size=4, crop_size=32, width=8)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    pixels = _crops(images, 64, 32, random.Random(1))  # the crops the scaling factor was measured on (seed + 1)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
    assert latents.shape[-2:] == (2, 2)  # 32 px / 16
    assert float((latents * vae.config.scaling_factor).std()) == pytest.approx(1.0, abs=1e-3)
    curve = summary["mse_curve"]
    assert sum(curve[-5:]) < sum(curve[:5])
    before = (tmp_path / "vae" / "lare_vae.json").stat().st_mtime_ns
    assert train_vae(images, tmp_path / "vae", steps=99) == summary  # finished: reused as it is
    assert (tmp_path / "vae" / "lare_vae.json").stat().st_mtime_ns == before


def test_small_unet_denoises_the_4x4_latents_of_a_64px_crop():
    from diffusers import UNet2DConditionModel
    from lare.losses import unet_config
    from lare.vae import small_unet_config

    paper, small = unet_config(4, 4), small_unet_config(4, 4)
    assert small["block_out_channels"] == tuple(c // 4 for c in paper["block_out_channels"])
    assert small["down_block_types"] == paper["down_block_types"] and small["layers_per_block"] == 1
    unet = UNet2DConditionModel(**small)
    noisy = torch.randn(2, 4, 4, 4)
    out = unet(noisy, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 3, 768)).sample
    assert out.shape == noisy.shape


def test_train_vae_command(tmp_path):
    from lare.cli import app
    from typer.testing import CliRunner

    (tmp_path / "images").mkdir()
    rows = []
    for i in range(3):
        tiny_image(i, 48).convert("RGB").save(tmp_path / "images" / f"{i}.png")
        rows.append({"id": str(i), "image": f"images/{i}.png", "question": "q?", "reasoning": "r.", "answer": "a"})
    rows.append({"id": "bad", "question": "no image"})
    data = tmp_path / "reasoning.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train-vae", "--data", str(data), "--images", str(tmp_path), "--out", str(tmp_path / "vae"),
            "--steps", "2", "--batch-size", "2", "--crop-size", "32", "--width", "8"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "vae" / "lare_vae.json").read_text())["images"] == 3
    assert "skipped 1 rows" in result.output
