"""Separately installable: `uv build --all-packages` gives one wheel per package, and `latent-core` + `lare`
install alone into a fresh virtual environment (as `pip install lare` would in a downstream project)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"latent_core", "heima", "lavit", "lare", "interpreters", "latent_apps"}

pytestmark = pytest.mark.slow


def _uv() -> str:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` exports UV, the path of its own binary
    if uv is None:
        pytest.fail("uv is not on PATH: `pip install uv` (the README's set-up)")
    return uv


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_wheels_build_and_lare_installs_alone(tmp_path):
    uv = _uv()
    dist = tmp_path / "dist"
    _run(uv, "build", "--all-packages", "--wheel", "--out-dir", str(dist))
    wheels = sorted(dist.glob("*.whl"))
    names = {w.name.split("-")[0] for w in wheels}
    assert names == PACKAGES, names
    assert all("-0.1.0-" in w.name for w in wheels)

    # Pin third-party versions to the lock (fast from uv's cache, and what CI tested), but install our own
    # packages only from the two wheels.
    constraints = tmp_path / "constraints.txt"
    _run(
        uv,
        "export",
        "--frozen",
        "--no-hashes",
        "--no-emit-workspace",
        "--no-dev",
        "--no-header",
        "--output-file",
        str(constraints),
    )
    venv = tmp_path / "venv"
    _run(uv, "venv", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    core = next(w for w in wheels if w.name.startswith("latent_core-"))
    lare = next(w for w in wheels if w.name.startswith("lare-"))
    _run(
        uv,
        "pip",
        "install",
        "--python",
        str(python),
        "--constraints",
        str(constraints),
        str(core),
        str(lare),
        cwd=tmp_path,
    )

    code = (
        "import importlib.util, lare, latent_core; "
        "assert lare.__version__ == latent_core.__version__ == '0.1.0'; "
        "assert importlib.util.find_spec('heima') is None, 'lare must not pull in heima'; "
        "assert 'site-packages' in lare.__file__, lare.__file__; print('ok')"
    )
    out = _run(str(python), "-c", code, cwd=tmp_path)
    assert out.stdout.strip() == "ok"
    version = _run(str(venv / "bin" / "lare"), "--version", cwd=tmp_path)
    assert version.stdout.startswith("lare 0.1.0")
