"""Tiny pretrained parts for LaRe: a CLIP vision tower (64 px, 4 px patches -> the 16x16 grid of ViT-L/14 at 224 px)
with its image processor, and a Qwen2 causal LM with a ChatML tokenizer that has no ``<image>`` token, each saved
like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def save_clip_part(out: Path, seed: int = 1) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=4
    )
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(out)
    return out


def save_qwen_part(out: Path, seed: int = 2) -> Path:
    from latent_core.testing import tiny_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer("qwen2_5_vl")  # ChatML specials, no <image>: what a Qwen2.5 tokenizer has
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lare_parts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lare-parts")
    return save_clip_part(root / "clip"), save_qwen_part(root / "qwen")


@pytest.fixture(scope="session")
def tiny_lare(lare_parts):
    """A composed LaRe model (small extractor: 2 layers, 4 heads, hidden 32; window 4 of 16) and its processor."""
    from lare import LareConfig, compose

    config = LareConfig(extractor_hidden=32, extractor_heads=4, window=4)
    model, processor = compose(str(lare_parts[0]), str(lare_parts[1]), config)
    with torch.no_grad():  # a fresh projector and extractor at a scale that moves the LLM's states visibly
        for p in model.extractor.ffn[-1].parameters():
            p.mul_(20)
    return model.eval(), processor


def _tiny_diffusion(seed: int = 0):
    """A tiny KL VAE (f = 2, 4 latent channels) and a tiny conditional U-Net (cross-attention width 12) of the
    diffusers classes L_img uses."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        sample_size=16,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    return vae, unet


@pytest.fixture
def tiny_diffusion():
    """A factory of fresh ``(vae, unet)`` pairs (see :func:`_tiny_diffusion`)."""
    return _tiny_diffusion
