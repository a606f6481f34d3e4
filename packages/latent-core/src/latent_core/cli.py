"""Building blocks for the method command lines (``heima``, ``lavit``, ``lare``, ``interpreters``, ``latent``)."""

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

__all__ = ["method_app", "versions_line"]

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
    """A Typer app named ``dist`` with ``--help`` and an eager ``--version``; commands are added by the caller."""
    app = typer.Typer(
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
