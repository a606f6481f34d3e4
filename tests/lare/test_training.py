"""LaRe's training forward and the four stages (Appendix A): every named loss is computed and reaches the modules it
should; one optimizer step of each stage changes exactly the parameters that stage trains and nothing else."""

from __future__ import annotations

import pytest
import torch
from lare import LareConfig
from lare.model import STAGE_GROUPS, LareForTraining
from latent_core.testing import tiny_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["What is it?", "How many red circles are in the picture?"]
REASONING = ["row 1 column 2: red circle. So the count is 2.", "The pixels around the square are white."]
ANSWERS = ["a circle", "two"]


def _training_model(lare_parts, stage: int) -> tuple[LareForTraining, object]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from lare import compose
    from lare.losses import Reconstructor

    model, processor = compose(
        str(lare_parts[0]), str(lare_parts[1]), LareConfig(extractor_hidden=32, extractor_heads=4, window=4)
    )
    torch.manual_seed(0)
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
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    training = LareForTraining(model, Reconstructor(48, unet), vae, scheduler, stage=stage, crop_size=16)
    return training.train(), processor


def _batch(processor) -> dict:
    from lare.generate import encode_questions
    from lare.losses import text_prefix_targets

    tokenizer = processor.tokenizer
    batch = encode_questions(processor, [tiny_image(i, 64) for i in range(2)], QUESTIONS)
    answers = [tokenizer(a + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    width = max(map(len, answers))
    ids = torch.full((2, width), tokenizer.pad_token_id)
    labels = torch.full((2, width), -100)
    for i, row in enumerate(answers):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    text_ids, text_labels = text_prefix_targets(tokenizer, REASONING, 32)
    reasoning = tokenizer(REASONING, padding="longest", padding_side="right", return_tensors="pt")
    return {**batch, "answer_ids": ids, "labels": labels, "text_ids": text_ids, "text_labels": text_labels,
            "reasoning_ids": reasoning["input_ids"], "reasoning_mask": reasoning["attention_mask"]}  # fmt: skip


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_changes_exactly_what_it_trains(lare_parts, stage):
    training, processor = _training_model(lare_parts, stage)
    groups = training.groups()
    trainable = {n for n, p in training.named_parameters() if p.requires_grad}
    by_module = {id(p): n for n, p in training.named_parameters()}
    expected = {by_module[id(p)] for name in STAGE_GROUPS[stage] for p in groups[name].parameters()}
    assert trainable == expected and not any(p.requires_grad for p in training.vae.parameters())
    assert not any(p.requires_grad for p in groups["vision"].parameters())

    before = {n: p.detach().clone() for n, p in training.named_parameters()}
    out = training(**_batch(processor))
    names = set(out["aux_losses"])
    assert names == (set() if stage == 1 else {"align_text", "align_visual", "img", "text"})
    loss = out["loss"] + sum(out["aux_losses"].values())
    loss.backward()
    optimizer = torch.optim.AdamW([p for p in training.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    optimizer.step()
    changed = {n for n, p in training.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= trainable  # nothing frozen moved (the vision tower, the LLM in stage 2, the VAE)
    for name in STAGE_GROUPS[stage]:  # every group the stage trains moved
        if stage == 1 and name != "projector":
            continue
        assert any(n in changed for n in (by_module[id(p)] for p in groups[name].parameters())), name


def test_every_aux_loss_reaches_the_extractor(lare_parts):
    training, processor = _training_model(lare_parts, 2)
    out = training(**_batch(processor))
    extractor = training.lare.extractor.ffn[-1].weight
    for name, value in out["aux_losses"].items():
        (grad,) = torch.autograd.grad(value, extractor, retain_graph=True)
        assert grad.abs().sum() > 0, name
        assert torch.isfinite(value), name
    unet = next(training.reconstructor.unet.parameters())
    assert torch.autograd.grad(out["aux_losses"]["img"], unet, retain_graph=True)[0].abs().sum() > 0
    with pytest.raises(ValueError, match="stages 1-4"):
        training.set_stage(5)
