"""latent_core.cli: one error handler and one runtime set-up for every method command line."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import typer
from latent_core.cli import MethodTyper, UserError, default_threads, method_app
from latent_core.trainer import StageError
from typer.testing import CliRunner

runner = CliRunner()


def _app() -> typer.Typer:
    app = method_app("latent-core", "test app")
    sub = MethodTyper()
    app.add_typer(sub, name="sub")

    @app.command()
    def missing(path: Path) -> None:
        path.read_text()  # FileNotFoundError

    @app.command()
    def bad(value: int = 0) -> None:
        raise ValueError(f"--value must be positive, got {value}")

    @app.command()
    def bug() -> None:
        raise KeyError("internal")  # not a user error: a real traceback

    @sub.command()
    def nested() -> None:
        raise UserError("nested command error")

    @app.command()
    def stage() -> None:
        raise StageError("runs/heima/stage-1 is missing: run heima train --stage 1 first")

    @app.command()
    def noisy() -> None:
        warnings.warn("deprecated in transformers", FutureWarning, stacklevel=1)  # attributed to this test module
        typer.echo(f"threads={torch.get_num_threads()}")

    return app


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    app = _app()
    result = runner.invoke(app, ["missing", str(tmp_path / "nope.txt")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: [Errno 2] No such file or directory: '{tmp_path}/nope.txt'"]
    # Any other bad value: one line too, with its type and how to see the traceback.
    result = runner.invoke(app, ["bad", "--value", "-3"])
    assert (result.exit_code, result.output) == (
        2, "error: ValueError: --value must be positive, got -3 (set LATENT_DEBUG=1 for the traceback)\n",
    )  # fmt: skip
    result = runner.invoke(app, ["stage"])  # the toolkit's own error classes: the message as is
    assert (result.exit_code, result.output) == (
        2,
        "error: runs/heima/stage-1 is missing: run heima train --stage 1 first\n",
    )
    result = runner.invoke(app, ["sub", "nested"])
    assert (result.exit_code, result.output) == (2, "error: nested command error\n")
    assert "Traceback" not in result.output
    # A programming error is not dressed up as a user error.
    result = runner.invoke(app, ["bug"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_debug_env_shows_the_exception(monkeypatch):
    monkeypatch.setenv("LATENT_DEBUG", "1")
    result = runner.invoke(_app(), ["bad"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_runtime_threads_and_our_warnings(monkeypatch):
    previous = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LATENT_THREADS", "1")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runner.invoke(_app(), ["noisy"])
        assert result.exit_code == 0 and "threads=1" in result.output
        # Only third-party modules are filtered: a FutureWarning raised in our code still shows.
        assert any("deprecated in transformers" in str(w.message) for w in caught)
        monkeypatch.delenv("LATENT_THREADS")
        result = runner.invoke(_app(), ["noisy"])
        assert f"threads={default_threads()}" in result.output
    finally:
        torch.set_num_threads(previous)


def test_third_party_future_warnings_are_filtered():
    from latent_core.cli import configure_runtime

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_runtime()
        # What transformers' modeling_utils emits on every gradient-checkpointed run.
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "x.py", 1,
                               module="transformers.modeling_utils")  # fmt: skip
        warnings.warn_explicit("ours", FutureWarning, "y.py", 1, module="heima.trainer")
    assert [str(w.message) for w in caught] == ["ours"]


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "expected"),
    [(64, "max 100000", 8), (64, "200000 100000", 2), (64, "150000 100000", 1), (64, "50000 100000", 1),
     (3, "400000 100000", 3), (2, None, 2)],
)  # fmt: skip
def test_default_threads(monkeypatch, tmp_path, affinity, cpu_max, expected):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max + "\n")
    assert default_threads(str(path)) == expected


@pytest.mark.parametrize("script", ["heima", "interpreters"])
def test_method_choice_flags_are_real_choices(script):
    import importlib

    app = importlib.import_module(f"{script}.cli").app
    command = "generate" if script == "heima" else "capture"
    args = ["--position", "middle"]
    result = runner.invoke(app, [command, *args])
    assert result.exit_code == 2 and "'middle' is not one of" in result.output and "predictor" in result.output
