"""The ``lare`` command line. Commands arrive with the method's implementation (see the project issues)."""

from latent_core.cli import method_app

import lare

app = method_app("lare", lare.__doc__)


def main() -> None:
    app(prog_name="lare")


if __name__ == "__main__":
    main()
