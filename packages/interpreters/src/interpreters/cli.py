"""The ``interpreters`` command line. Commands arrive with the method's implementation (see the project issues)."""

from latent_core.cli import method_app

import interpreters

app = method_app("interpreters", interpreters.__doc__)


def main() -> None:
    app(prog_name="interpreters")


if __name__ == "__main__":
    main()
