"""The ``heima`` command line. Commands arrive with the method's implementation (see the project issues)."""

from latent_core.cli import method_app

import heima

app = method_app("heima", heima.__doc__)


def main() -> None:
    app(prog_name="heima")


if __name__ == "__main__":
    main()
