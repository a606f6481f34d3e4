"""`lare train`: the four stages chained through the run directory. Stage 1 changes the projector only, stage 2 the
extractor (and the U-Net) only, a stage loads like a checkpoint (load_lare) and generates, and a stage without its
predecessor is one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from latent_core.testing import tiny_image
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(lare_parts, tmp_path_factory):
    from lare.cli import app

    root = tmp_path_factory.mktemp("stages")
    rows = []
    for i in range(4):
        tiny_image(i, 64).save(root / f"{i}.png")
        rows.append({"id": f"s{i}", "image": f"{i}.png", "question": f"How many shapes in picture {i}?",
                     "reasoning": f"row 1 column {i}: red circle. So the count is {i}.", "answer": str(i)})  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    init = root / "init"
    result = CliRunner().invoke(app, ["init", "--vision", str(lare_parts[0]), "--llm", str(lare_parts[1]), "--out",
                                      str(init), "--extractor-hidden", "32", "--extractor-heads", "4", "--window",
                                      "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return root, init


def _train(root, init, stage, *extra):
    from lare.cli import app

    args = ["train", "--stage", str(stage), "--data", str(root / "train.jsonl"), "--images", str(root), "--base",
            str(init), "--run-dir", str(root / "run"), "--max-steps", "2", "--batch-size", "2", "--learning-rate",
            "1e-2", "--img-weight", "0", *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def _changed(a, b) -> set[str]:
    sa, sb = a.state_dict(), b.state_dict()
    return {k for k in sa if not torch.equal(sa[k], sb[k])}


def test_stages_chain_and_train_only_their_parts(setup):
    from lare import generate_answers, load_lare

    root, init = setup
    refused = _train(root, init, 3)
    assert refused.exit_code == 2 and "run stage 2" in refused.output and "Traceback" not in refused.output

    assert _train(root, init, 1).exit_code == 0
    base, _ = load_lare(init, device="cpu")
    one, _ = load_lare(root / "run" / "stage-1", device="cpu")
    changed = _changed(base.vlm, one.vlm)
    assert changed and all("multi_modal_projector" in k for k in changed)
    assert not _changed(base.extractor, one.extractor)
    summary = json.loads((root / "run" / "stage-1" / "lare_train.json").read_text())
    assert summary["steps"] == 2 and summary["stage"] == 1 and summary["loss_curves"]["ntp_loss"]

    result = _train(root, init, 2)
    assert result.exit_code == 0, result.output
    two, processor = load_lare(root / "run" / "stage-2", device="cpu")
    assert not _changed(one.vlm, two.vlm)  # stage 2 trains the extractor only; stage 1's projector is re-applied
    assert _changed(one.extractor, two.extractor)
    curves = json.loads((root / "run" / "stage-2" / "lare_train.json").read_text())["loss_curves"]
    assert curves["align_text_loss"] and curves["text_loss"] and not curves["img_loss"]
    answers = generate_answers(two, processor, [tiny_image(0, 64)], ["How many shapes?"], 3)
    assert answers.latent_steps == [4]


def test_stage_two_with_the_diffusion_reconstructor(setup, tmp_path, tiny_diffusion):
    from lare.config import LareTrainConfig
    from lare.losses import Reconstructor
    from lare.trainer import RECONSTRUCTOR_WEIGHTS, train_stage
    from latent_core.readers import read_reasoning
    from safetensors.torch import load_file

    root, init = setup
    vae, unet = tiny_diffusion()
    reconstructor = Reconstructor(48, unet)
    start = {k: v.clone() for k, v in reconstructor.state_dict().items()}
    rows = list(read_reasoning(root / "train.jsonl", root))
    run = tmp_path / "run"
    config = LareTrainConfig(output_dir=str(run / "stage-1"), per_device_train_batch_size=2, max_steps=1,
                             learning_rate=1e-2, report_to=[], remove_unused_columns=False, logging_steps=1,
                             crop_size=16)  # fmt: skip
    train_stage(config, 1, rows, init, run)
    config.output_dir = str(run / "stage-2")
    summary = train_stage(config, 2, rows, init, run, vae=vae, reconstructor=reconstructor)
    assert summary["loss_curves"]["img_loss"] and summary["terms"] == ["align", "img", "text"]
    saved = load_file(run / "stage-2" / RECONSTRUCTOR_WEIGHTS)
    assert any(not torch.equal(saved[k], start[k]) for k in start)  # the U-Net trained in stage 2


def test_probe_command_on_a_stage(setup, tmp_path):
    from lare.cli import app

    root, init = setup
    args = ["probe", "--model", str(init), "--data", str(root / "train.jsonl"), "--images", str(root), "--out",
            str(tmp_path / "probe"), "--pairs", "10", "--seeds", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert summary["samples"] == 4 and {"text", "vision"} <= summary.keys()
    for kind in ("text", "vision"):
        assert 0.0 <= summary[kind]["svm_accuracy"] <= 1.0 and summary[kind]["pairs"] == 20
