"""The command lines: `latent` (apps/cli) and the four method scripts; the demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from latent_apps.cli import app as latent_app
from latent_core.testing import TINY_FAMILIES
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("heima", "lavit", "lare", "interpreters")
runner = CliRunner()


@pytest.mark.parametrize("script", METHODS)
def test_method_scripts_help_and_version(script):
    """The installed console scripts themselves (entry points), not only the Typer objects."""
    exe = Path(sys.executable).parent / script
    assert exe.is_file(), f"console script {script} is not installed in {exe.parent}"
    help_out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert help_out.returncode == 0 and f"Usage: {script}" in help_out.stdout
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith(f"{script} 0.1.0 (latent-core 0.1.0, torch ")


def test_apps_cli_runs_as_directory_and_script():
    out = subprocess.run([sys.executable, str(ROOT / "apps" / "cli"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "Usage: latent" in out.stdout and "demo" in out.stdout
    exe = Path(sys.executable).parent / "latent"
    assert subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout.startswith("latent-apps")


def test_demo_runs_every_family_and_the_shipped_models(tmp_path):
    result = runner.invoke(
        latent_app,
        ["demo", "--out", str(tmp_path), "--max-new-tokens", "4", "--questions", "24", "--lavit-questions", "8"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["family"] for r in summary["families"]] == list(TINY_FAMILIES)
    for record in summary["families"]:
        assert 0 < record["params"] < 2_000_000
        assert 1 <= record["generated_tokens"] <= 4
        assert record["prompt_tokens"] > 0 and record["forward_ms"] > 0 and record["generate_ms"] > 0
    # The image reached the models: the llava prompt holds its 256 expanded image tokens.
    llava = next(r for r in summary["families"] if r["family"] == "llava")
    assert llava["prompt_tokens"] > 256
    for family in TINY_FAMILIES:
        assert family in result.output
    # The shipped models on the same 24 test questions: the CoT base reads the image (blank images fall far
    # below), answers every question inside the budget; the shipped Heima generates its 3 thinking tokens and a
    # fraction of the base's tokens.
    shipped = summary["heima"]
    base, heima = shipped["rows"]["base"], shipped["rows"]["heima"]
    assert shipped["n"] == base["n"] == heima["n"] == 24
    assert base["truncated"] == base["unanswered"] == heima["truncated"] == heima["unanswered"] == 0
    assert base["accuracy"] >= 0.8 and base["accuracy"] >= base["blank_accuracy"] + 0.3
    assert heima["thinking_tokens"] == 3
    assert heima["generated_tokens"] < base["generated_tokens"] / 4
    assert "shipped mllama base (CoT) vs shipped Heima" in result.output
    # LaViT's pipeline on the shipped bases (8 build questions): the build's counts add up, a student trained, both
    # models answered the 4 test questions and the overlays were written.
    lavit = summary["lavit"]
    build = lavit["build"]
    assert build["samples"] == 8 and build["kept"] + sum(build["rejected"].values()) == 8 and build["kept"] >= 1
    assert lavit["train"]["steps"] == 20 and len(lavit["answers"]) == 8
    assert lavit["analysis"]["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert sorted(p.name for p in (tmp_path / "lavit" / "overlays").iterdir()) == [f"00{i}.png" for i in range(4)]
    # LaRe's pipeline on the shipped llava base: stages I and II trained (L_align and L_text), 4 questions decoded
    # with adaptive halting, each with its own latent steps (2..4: halting is checked after z_2 and z_3)
    lare = summary["lare"]
    assert lare["train"]["1"]["steps"] == 2 and lare["train"]["2"]["steps"] == 10
    assert lare["train"]["2"]["terms"] == ["align", "text"]
    assert len(lare["answers"]) == 4 and all(2 <= a["latent_steps"] <= 4 for a in lare["answers"])
    assert "LaRe demo: decoding with adaptive halting" in result.output
    # The proving ground from its shipped artefacts: the mixed base's CoT reads the image (blank images fall far
    # below) inside the budget, its direct answer and the shipped Coconut generate a fraction of CoT's tokens,
    # Coconut's 6 thoughts (c = 2, 3 stages) are used by the zeroed / shuffled controls; the shipped table's rows
    # carry the seed spread of reproduce all and its targets are printed met or not.
    ground = summary["proving_ground"]
    cot, direct = ground["rows"]["CoT (the base)"], ground["rows"]["direct (the base)"]
    coconut = ground["rows"]["Coconut, seed 0"]
    assert ground["n"] == cot["n"] == direct["n"] == coconut["n"] == 24
    assert cot["truncated"] == direct["truncated"] == coconut["truncated"] == 0
    assert cot["accuracy"] >= cot["blank_accuracy"] + 0.3
    assert direct["generated_tokens"] < 5 and coconut["generated_tokens"] < cot["generated_tokens"] / 4
    assert coconut["mean_latent_steps"] == 6
    assert set(coconut["latent_controls"]) >= {"zero", "shuffle"}
    table = ground["table"]
    assert {"CoT (the base)", "direct (the base)"} <= set(table)
    assert any(len(row["seeds"]) == 3 for row in table.values())
    assert "proving ground, shipped" in result.output and "made by: uv run apps/cli reproduce all" in result.output
    assert result.output.count("target ") == len(ground["targets"])
    # the hop rows' floor is shown with them: the shipped questions' moves alone answer most 2-3 hop questions
    assert ground["hop_shortcut"]["hop23"] > table["direct (the base)"]["hop23_accuracy"]["mean"]
    assert "answered from the moves alone" in " ".join(result.output.split())


def test_demo_rejects_unknown_family_and_missing_data(tmp_path):
    result = runner.invoke(latent_app, ["demo", "--family", "gpt5", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown family gpt5" in result.output
    result = runner.invoke(latent_app, ["demo", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "demo data not found" in result.output
