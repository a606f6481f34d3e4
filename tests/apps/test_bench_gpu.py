"""`bench gpu` and `apps/gpu_check.sh` without a GPU: the tiny-scale dry run of every case on CPU (what runs at real
size on a GPU is the same code), the refusal of --scale real on CPU, and the check script: valid bash, naming every
registered bench, going on past a failure or a timeout and listing them."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from latent_apps.bench.gpu import CASES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "apps" / "gpu_check.sh"


def _registered_benches() -> set[str]:
    from latent_apps.cli import bench_app

    return {command.name or command.callback.__name__ for command in bench_app.registered_commands}


def test_tiny_dry_run_on_cpu(capsys):
    from latent_apps.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["bench", "gpu", "--device", "cpu", "--scale", "tiny", "--json", "--steps", "2"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    *cases, summary = lines
    assert summary["bench"] == "gpu" and summary["failed"] == [] and summary["cases"] == cases
    assert [r["case"] for r in cases] == list(CASES)
    for record in cases:
        assert "error" not in record, record
        assert record["device"] == "cpu" and record["scale"] == "tiny" and record["dtype"] == "float32"
        assert record["peak_memory_gib"] is None and record["steps"] == 2
        assert math.isfinite(record["step_time_s"]) and record["step_time_s"] > 0
        assert record["tokens"] > 0 and record["tokens_per_s"] > 0 and record["params"] > 0
    by_case = {r["case"]: r for r in cases}
    for name in ("heima-stage", "lavit-student", "lare-step"):  # the training cases
        record = by_case[name]
        assert 0 < record["trainable"] < record["params"], name  # LoRA / a frozen vision tower
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]), name
        assert all(math.isfinite(v) for v in record["loss_terms"].values()), name
    assert {"concept", "traj", "ntp"} <= by_case["lavit-student"]["loss_terms"].keys()
    assert by_case["lavit-student"]["gamma"] < 1  # the gate was on
    assert {"align_text", "align_visual", "img", "text"} <= by_case["lare-step"]["loss_terms"].keys()
    assert by_case["lavit-teacher"]["trainable"] == 0 and by_case["lavit-teacher"]["finite_outputs"]


def test_real_scale_on_cpu_refuses_in_one_line():
    from latent_apps.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["bench", "gpu", "--device", "cpu", "--scale", "real"])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "needs CUDA" in message and "--scale tiny" in message


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_names_every_registered_bench():
    text = SCRIPT.read_text()
    listed = set(re.search(r"^BENCHES=\(([^)]*)\)", text, re.MULTILINE).group(1).split())
    assert "bench gpu --scale real --device cuda --json" in text
    assert listed == _registered_benches() - {"gpu"}, "add the new bench to BENCHES in apps/gpu_check.sh"


def test_gpu_check_goes_on_past_failures(tmp_path):
    stub = tmp_path / "uv.sh"  # stands in for `uv run`: one bench fails, one hangs past its limit
    stub.write_text('case "$3" in latent-train) exit 3 ;; gating) sleep 10 ;; *) echo "ran $*" ;; esac\n')
    env = {"PATH": "/usr/bin:/bin", "UV_RUN": f"bash {stub}", "GPU_CHECK_BENCH_TIMEOUT": "1"}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    out = result.stdout
    assert "ran apps/cli bench gpu --scale real --device cuda --json" in out
    assert "ran apps/cli bench attention-capture --device cuda --json" in out  # after the failure: went on
    failed = out.split("== FAILED (2):")[1]
    assert "bench latent-train --device cuda --json (exit status 3)" in failed
    assert "bench gating --device cuda --json (timed out after 1 s)" in failed
