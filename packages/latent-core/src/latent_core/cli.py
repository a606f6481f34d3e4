"""Building blocks for the method command lines (``heima``, ``lavit``, ``lare``, ``interpreters``, ``latent``).

Every command registered on a :class:`MethodTyper` (the apps :func:`method_app` makes, and their sub-apps) runs
through one wrapper, :func:`guarded`, that

- sets the runtime up once (:func:`configure_runtime`): a torch thread count that does not oversubscribe the CPU
  (:func:`default_threads`), and filters for third-party deprecation noise (never for our own warnings);
- turns a user error into one line on stderr and exit status 2 instead of a traceback: a missing or malformed file,
  a stage that is not there, a corrupted checkpoint, a model of the wrong family (:class:`UserError` and the
  toolkit's error classes: the message as is), or any other bad value (``ValueError`` / ``OSError``: the message
  with its type and a hint). ``LATENT_DEBUG=1`` shows the traceback instead.
"""

import functools
import os
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import typer

__all__ = [
    "BF16_OPTION",
    "MethodTyper",
    "UserError",
    "configure_runtime",
    "default_threads",
    "guarded",
    "method_app",
    "other_accelerator",
    "versions_line",
]

DEBUG_ENV = "LATENT_DEBUG"
"""Set to 1 to see the traceback of a user error instead of the one-line message."""
THREADS_ENV = "LATENT_THREADS"
"""Torch intra-op threads for the commands (default :func:`default_threads`)."""


BF16_OPTION = Annotated[
    bool | None,
    typer.Option(
        "--bf16/--no-bf16",
        help="bf16 mixed precision: the base loads in bf16, the trained weights train as fp32 master copies, compute "
        "runs in bf16 (HF Trainer / DeepSpeed style). Default: on iff CUDA supports bf16.",
    ),
]
"""The ``--bf16/--no-bf16`` option of every method's train command (one definition)."""


class UserError(Exception):
    """An error the user can fix (missing data, a bad option); the CLIs print its message as one line. Errors of
    other kinds that mean the same are caught too: ``ValueError``, ``OSError`` and safetensors errors."""


def default_threads(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """Torch intra-op threads: the cores this process may use (CPU affinity and the cgroup v2 CPU quota read from
    ``cpu_max``, ``"<quota> <period>"`` or ``"max <period>"``), at most 8. On a small shared CPU torch's default can
    oversubscribe and run many times slower."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        with open(cpu_max) as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, min(8, cores))


# Third-party noise on every normal run (deprecations inside transformers/peft/torch/deepspeed that we cannot act on).
_NOISY_MODULES = r"(transformers|peft|torch|deepspeed|accelerate|datasets)(\..*)?"


def configure_runtime() -> None:
    """What every command does first: torch threads (``LATENT_THREADS``, else ``OMP_NUM_THREADS`` when set, else
    :func:`default_threads`) and warning filters for third-party ``FutureWarning``/``DeprecationWarning`` noise and
    DeepSpeed's accelerator banner. Our own warnings and errors are never filtered."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_NOISY_MODULES)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of every method
        return
    if "DS_ACCELERATOR" not in os.environ and not (torch.cuda.is_available() or other_accelerator()):
        os.environ["DS_ACCELERATOR"] = "cpu"  # what DeepSpeed's auto-detection picks, without its warning banner
    threads = os.environ.get(THREADS_ENV) or (None if "OMP_NUM_THREADS" in os.environ else str(default_threads()))
    if threads:
        torch.set_num_threads(max(1, int(threads)))


def other_accelerator() -> bool:
    """Whether an accelerator other than CUDA (Apple MPS, Intel XPU) is available: torch, the Trainer and DeepSpeed
    would use it."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool((mps is not None and mps.is_available()) or (xpu is not None and xpu.is_available()))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is all a user needs: printed as is."""
    from latent_core.families import FamilyError
    from latent_core.hub import CheckpointError, ModelNotAvailableError, UnknownAliasError
    from latent_core.readers import DataFormatError
    from latent_core.trainer import StageError

    errors: tuple[type[BaseException], ...] = (
        UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FamilyError,
        CheckpointError, ModelNotAvailableError, UnknownAliasError, DataFormatError, StageError,
    )  # fmt: skip
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # pragma: no cover
        pass
    return errors


def guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` as a command: :func:`configure_runtime` first; a user error becomes ``error: <message>`` on stderr and
    exit status 2 (``LATENT_DEBUG=1``: re-raised with its traceback)."""

    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            configure_runtime()
            return func(*args, **kwargs)
        except (ValueError, OSError, UserError, *_user_errors()) as err:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            message = str(err) or type(err).__name__
            if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
                message = f"{err.filename}: {message}"
            if not isinstance(err, _user_errors()):  # a bad value somewhere deeper: say what it was and how to see it
                message = f"{type(err).__name__}: {message} (set {DEBUG_ENV}=1 for the traceback)"
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None

    return command


class MethodTyper(typer.Typer):
    """A ``typer.Typer`` whose commands run through :func:`guarded` (one error handler for every method CLI)."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            register(guarded(func))
            return func

        return decorator


_STACK = ("latent-core", "torch", "transformers", "peft", "deepspeed")


def _version_of(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def versions_line(dist: str) -> str:
    """``"heima 0.1.0 (latent-core 0.1.0, torch 2.15.0, ...)"``, read from package metadata (imports nothing)."""
    others = ", ".join(f"{d} {_version_of(d)}" for d in _STACK if d != dist)
    return f"{dist} {_version_of(dist)} ({others})"


def method_app(dist: str, help: str) -> typer.Typer:
    """A :class:`MethodTyper` named ``dist`` with ``--help`` and an eager ``--version``; commands are added by the
    caller and run through :func:`guarded`."""
    app = MethodTyper(
        name=dist,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_show_locals=False,
    )

    def _show_version(value: bool) -> None:
        if value:
            typer.echo(versions_line(dist))
            raise typer.Exit()

    @app.callback()
    def _root(
        version: Annotated[
            bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show the versions and exit.")
        ] = False,
    ) -> None:
        pass

    _root.__doc__ = help
    return app
