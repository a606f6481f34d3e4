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


def _training_model(lare_parts, stage: int, tiny_diffusion) -> tuple[LareForTraining, object]:
    from diffusers import DDPMScheduler
    from lare import compose
    from lare.losses import Reconstructor

    model, processor = compose(
        str(lare_parts[0]), str(lare_parts[1]), LareConfig(extractor_hidden=32, extractor_heads=4, window=4)
    )
    vae, unet = tiny_diffusion()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    training = LareForTraining(model, Reconstructor(48, unet), vae, scheduler, stage=stage, crop_size=16)
    return training.train(), processor


def _rows(tmp_path) -> list[dict]:
    rows = []
    for i, (q, r, a) in enumerate(zip(QUESTIONS, REASONING, ANSWERS, strict=True)):
        tiny_image(i, 64).save(tmp_path / f"{i}.png")
        rows.append({"id": str(i), "image": tmp_path / f"{i}.png", "question": q, "reasoning": r, "answer": a})
    return rows


def _batch(processor, tmp_path) -> dict:
    from lare.data import LareCollator

    return LareCollator(processor)(_rows(tmp_path))


def test_collator_builds_every_target_by_hand(lare_parts, tmp_path):
    from lare import compose
    from lare.generate import encode_questions

    _, processor = compose(str(lare_parts[0]), str(lare_parts[1]), LareConfig(extractor_hidden=32, extractor_heads=4))
    tokenizer = processor.tokenizer
    batch = _batch(processor, tmp_path)
    prompt = encode_questions(processor, [tiny_image(i, 64) for i in range(2)], QUESTIONS)
    assert torch.equal(batch["input_ids"], prompt["input_ids"]) and bool((prompt["attention_mask"] == 0).any())
    for i, answer in enumerate(ANSWERS):  # the assistant turn as the template writes it: answer + <|im_end|>\n
        want = tokenizer(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert batch["labels"][i][batch["labels"][i] != -100].tolist() == want
        reasoning = tokenizer(REASONING[i], add_special_tokens=False)["input_ids"]
        assert batch["text_labels"][i][batch["text_labels"][i] != -100].tolist() == reasoning[:32]
        assert batch["reasoning_ids"][i][batch["reasoning_mask"][i].bool()].tolist() == reasoning


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_changes_exactly_what_it_trains(lare_parts, tiny_diffusion, stage, tmp_path):
    training, processor = _training_model(lare_parts, stage, tiny_diffusion)
    groups = training.groups()
    trainable = {n for n, p in training.named_parameters() if p.requires_grad}
    by_module = {id(p): n for n, p in training.named_parameters()}
    expected = {by_module[id(p)] for name in STAGE_GROUPS[stage] for p in groups[name].parameters()}
    assert trainable == expected and not any(p.requires_grad for p in training.vae.parameters())
    assert not any(p.requires_grad for p in groups["vision"].parameters())

    before = {n: p.detach().clone() for n, p in training.named_parameters()}
    out = training(**_batch(processor, tmp_path))
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


def test_every_aux_loss_reaches_the_extractor(lare_parts, tiny_diffusion, tmp_path):
    training, processor = _training_model(lare_parts, 2, tiny_diffusion)
    out = training(**_batch(processor, tmp_path))
    extractor = training.lare.extractor.ffn[-1].weight
    for name, value in out["aux_losses"].items():
        (grad,) = torch.autograd.grad(value, extractor, retain_graph=True)
        assert grad.abs().sum() > 0, name
        assert torch.isfinite(value), name
    unet = next(training.reconstructor.unet.parameters())
    assert torch.autograd.grad(out["aux_losses"]["img"], unet, retain_graph=True)[0].abs().sum() > 0
    with pytest.raises(ValueError, match="stages 1-4"):
        training.set_stage(5)


def test_without_extractor_training_keeps_the_text_terms(lare_parts, tiny_diffusion, tmp_path):
    import dataclasses

    training, processor = _training_model(lare_parts, 2, tiny_diffusion)
    training.lare.config = dataclasses.replace(training.lare.config, extractor=False)
    out = training(**_batch(processor, tmp_path))
    assert set(out["aux_losses"]) == {"align_text", "img", "text"}  # no window, so no visual anchors
    assert all(torch.isfinite(v) for v in out["aux_losses"].values())
