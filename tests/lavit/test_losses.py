"""LaViT's losses against hand computations: L_concept, L_traj (KL per latent token, renormalised rows) and the
the resampling of A_traj onto another grid (area pooling down, bilinear up), the warm-up."""

from __future__ import annotations

import math

import pytest
import torch
from lavit.losses import ConceptHead, concept_loss, resample_trajectory, trajectory_loss


def test_concept_loss_by_hand():
    projected = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    v_sem = torch.tensor([[0.0, 2.0], [3.0, 3.0]])
    # cos = 0 and 1: losses 1 and 0, mean 0.5.
    assert float(concept_loss(projected, v_sem)) == 0.5
    head = ConceptHead(4, 6)
    assert head(torch.randn(3, 4)).shape == (3, 6)
    assert [type(m).__name__ for m in head.net] == ["Linear", "GELU", "Linear"]


def test_trajectory_loss_by_hand():
    target = torch.tensor([0.75, 0.25, 0.0])
    rows = torch.tensor([[2.0, 1.0, 1.0], [0.5, 0.5, 0.0]])  # renormalised: [0.5, 0.25, 0.25] and [0.5, 0.5, 0]
    expected = (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.25)) + (
        0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    )
    assert abs(float(trajectory_loss(target, rows)) - expected) < 1e-6
    assert float(trajectory_loss(target, torch.tensor([[3.0, 1.0, 0.0]]))) < 1e-6  # the same distribution: 0
    rows = rows.clone().requires_grad_(True)
    trajectory_loss(target, rows).backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0


def test_resampling_onto_another_grid_by_hand():
    # A 2 x 2 map onto 4 x 4 (align_corners=False): the outer student cells copy their teacher cell, the inner ones
    # blend neighbours with weights 3/4 and 1/4 per axis; then renormalised.
    target = torch.tensor([1.0, 0.0, 0.0, 0.0])
    got = resample_trajectory(target, (2, 2), (4, 4)).reshape(4, 4)
    # Student cell i's centre sits at 0.5 i - 0.25 in teacher cells (clamped to [0, 1]): teacher cell 0's weight.
    axis = torch.tensor([1.0, 0.75, 0.25, 0.0])
    expected = axis[:, None] * axis[None, :]
    expected = expected / expected.sum()
    torch.testing.assert_close(got, expected)
    assert abs(float(got.sum()) - 1) < 1e-6
    same = torch.tensor([0.2, 0.3, 0.5])
    assert resample_trajectory(same, (1, 3), (1, 3)) is same


def test_config_defaults_are_table_a1_and_the_authors_preset(tmp_path):
    import pytest
    from lavit.config import LavitConfig, latent_tokens

    paper = LavitConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert (paper.learning_rate, paper.lr_scheduler_type, paper.weight_decay) == (5e-6, "linear", 0.0)
    assert (paper.max_steps, paper.per_device_train_batch_size, paper.num_latents) == (1000, 16, 4)
    assert (paper.gate, paper.gate_warmup, paper.gate_eps, paper.concept_weight, paper.traj_weight) == (
        "cosine", 400, 1e-6, 0.3, 0.3
    )  # fmt: skip
    assert (paper.min_pixels, paper.max_pixels, paper.latent_mode) == (200_704, 1_003_520, "continuous")
    authors = LavitConfig.preset("authors", output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert (authors.weight_decay, authors.max_pixels, authors.latent_mode) == (0.1, 4_194_304, "discrete")
    assert latent_tokens(2) == ["<v-trace_1>", "<v-trace_2>"]
    with pytest.raises(ValueError, match="latent_mode"):
        LavitConfig(output_dir=str(tmp_path), use_cpu=True, latent_mode="both")
    with pytest.raises(ValueError, match="unknown preset"):
        LavitConfig.preset("mine", output_dir=str(tmp_path))


def test_resampling_onto_a_coarser_grid_keeps_every_top_k_peak():
    # 8 Top-K peaks on a 32 x 32 teacher grid onto the student's 8 x 8: each 4 x 4 block of teacher cells is one
    # student cell, so the student map is the block sum of the teacher's (by hand), renormalised. Bilinear sampling
    # without antialiasing reads 4 teacher cells per student cell and misses peaks (here: all of them).
    target = torch.zeros(32, 32)
    peaks = [(0, 0), (4, 11), (8, 3), (12, 28), (16, 19), (20, 7), (24, 27), (31, 15)]
    for n, (r, c) in enumerate(peaks):
        target[r, c] = n + 1.0
    target = target / target.sum()
    got = resample_trajectory(target.flatten(), (32, 32), (8, 8)).reshape(8, 8)
    expected = torch.zeros(8, 8)
    for n, (r, c) in enumerate(peaks):
        expected[r // 4, c // 4] += (n + 1.0) / 36.0
    torch.testing.assert_close(got, expected)
    # A non-integer ratio: the centre cell of a 3 x 3 map overlaps each cell of a 2 x 2 one by half per axis.
    centre = torch.zeros(9)
    centre[4] = 1.0
    torch.testing.assert_close(resample_trajectory(centre, (3, 3), (2, 2)), torch.full((4,), 0.25))


def test_the_trainer_warms_up_for_three_percent_of_the_steps(tmp_path):
    # Table A1: warm-up ratio 0.03 of 1000 steps = 30 steps from 0 to 5e-6, then linear decay to 0 at step 1000,
    # read from the scheduler HF's Trainer builds from the config (transformers 5 ignores a `warmup_ratio` field).
    from lavit.config import LavitConfig
    from transformers import Trainer

    config = LavitConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=config)
    trainer.create_optimizer_and_scheduler(num_training_steps=config.max_steps)
    lrs = []
    for _ in range(61):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    expected = [5e-6 * t / 30 if t < 30 else 5e-6 * (1000 - t) / 970 for t in range(61)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-15)
