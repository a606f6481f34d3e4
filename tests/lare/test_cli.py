"""The command lines: `lare init` (composing the parts, one-line errors), `lare generate` (one line per question,
halting), and `latent eval --method lare` (halting, latent-step distribution, the latent diagnostics, and the
same answers as the library call)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MMSTAR = "data/fixtures/vlmevalkit/MMStar_mini.tsv"


@pytest.fixture(scope="module")
def checkpoint(lare_parts, tmp_path_factory):
    from lare.cli import app

    out = tmp_path_factory.mktemp("lare") / "init"
    args = ["init", "--vision", str(lare_parts[0]), "--llm", str(lare_parts[1]), "--out", str(out),
            "--extractor-hidden", "32", "--extractor-heads", "4", "--window", "4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_init_writes_a_loadable_checkpoint_and_a_summary(checkpoint):
    from lare import load_lare

    summary = json.loads((checkpoint / "lare_init.json").read_text())
    assert summary["grid"] == [16, 16] and summary["window"] == 4 and summary["extractor_parameters"] > 0
    model, _ = load_lare(checkpoint, device="cpu")
    assert (model.bot_id, model.eot_id) == (summary["bot_id"], summary["eot_id"])


def test_init_refuses_bad_input_in_one_line(tmp_path, lare_parts):
    from lare.cli import app

    result = CliRunner().invoke(app, ["init", "--vision", "no-such-alias-xyz", "--llm", str(lare_parts[1]),
                                      "--out", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["init", "--vision", str(lare_parts[0]), "--llm", str(lare_parts[1]),
                                      "--out", str(tmp_path / "y"), "--window", "17"])  # fmt: skip
    assert result.exit_code == 2 and "larger than the 16x16" in result.output


def test_generate_command_writes_answers_with_latent_steps(checkpoint, tmp_path):
    from lare.cli import app

    out = tmp_path / "answers.jsonl"
    args = ["generate", "--model", str(checkpoint), "--data", MMSTAR, "--out", str(out), "--limit", "3",
            "--max-new-tokens", "3", "--halt", "l2", "--threshold", "1e9"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["latent_steps"] == 2 and len(r["windows"]) == 2 for r in rows)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["latent_steps_distribution"] == {"2": 3} and summary["halt"] == "l2"
    # --latent-diagnostics: zeroed and shuffled answers per row, change rates = the rows' own comparison
    result = CliRunner().invoke(app, [*args[:-4], "--latent-diagnostics", "--limit", "3"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["latent_steps_distribution"] == {"4": 3} and summary["halt"] is None
    for kind in ("zero", "shuffle"):
        changed = sum(r["controls"][kind] != r["answer"] for r in rows) / 3
        assert summary["change_rate"][kind] == pytest.approx(changed)
    correct = [r["generated_tokens"] for r in rows if r["correct"]]
    assert summary["mean_generated_tokens_correct"] == (sum(correct) / len(correct) if correct else None)
    assert summary["mean_latent_similarity"] == pytest.approx(sum(r["latent_similarity"] for r in rows) / 3)
    bad = CliRunner().invoke(app, ["generate", "--model", str(checkpoint), "--data", MMSTAR, "--threshold", "0.1"])
    assert bad.exit_code == 2 and "--halt" in bad.output


def test_latent_eval_method_lare(checkpoint, tmp_path):
    from lare import generate_answers, load_lare
    from latent_apps.cli import app as latent_app
    from latent_apps.eval.methods import build_prompt_text
    from latent_core.readers import read_vlmevalkit_tsv

    args = ["eval", "--model", str(checkpoint), "--method", "lare", "--bench", MMSTAR, "--out", str(tmp_path / "e"),
            "--limit", "4", "--batch-size", "4", "--max-new-tokens", "3", "--halt", "cos", "--threshold", "0.02",
            "--latent-diagnostics"]  # fmt: skip
    result = CliRunner().invoke(latent_app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["method_options"] == {"diagnostics": True, "halt": "cos", "threshold": 0.02}
    bench = summary["benches"]["MMStar_mini"]
    records = [json.loads(x) for x in (tmp_path / "e" / "MMStar_mini" / "samples.jsonl").read_text().splitlines()]
    steps = [r["latent_steps"] for r in records]
    assert bench["latent_steps_distribution"] == {str(k): steps.count(k) for k in sorted(set(steps))}
    assert bench["mean_latent_steps"] == pytest.approx(sum(steps) / 4)
    assert sorted(bench["latent_controls"]) == ["shuffle", "zero"]
    assert bench["mean_latent_similarity"] == pytest.approx(sum(r["latent_similarity"] for r in records) / 4)
    assert "mean_generated_tokens_correct" in bench

    # the same answers as the library call on the same batch (the method adds nothing of its own)
    samples = list(read_vlmevalkit_tsv(MMSTAR))[:4]
    model, processor = load_lare(checkpoint, device="cpu")
    direct = generate_answers(
        model, processor, [s["image"] for s in samples], [build_prompt_text(s, None) for s in samples], 3,
        halt="cos", threshold=0.02,
    )  # fmt: skip
    assert [r["prediction"] for r in records] == direct.texts and steps == direct.latent_steps

    refused = CliRunner().invoke(latent_app, ["eval", "--model", "x", "--bench", MMSTAR, "--halt", "cos"])
    assert refused.exit_code == 2 and "--method lare" in refused.output
    # MMStar_mini's row 4 has two images: one clear line, no traceback
    args = ["eval", "--model", str(checkpoint), "--method", "lare", "--bench", MMSTAR, "--out", str(tmp_path / "m"),
            "--batch-size", "8", "--max-new-tokens", "2"]  # fmt: skip
    result = CliRunner().invoke(latent_app, args)
    assert result.exit_code == 2 and "one image per question" in result.output and "Traceback" not in result.output
