"""The ``lavit`` command line. Commands arrive with the method's implementation (see the project issues)."""

from latent_core.cli import method_app

import lavit

app = method_app("lavit", lavit.__doc__)


def main() -> None:
    app(prog_name="lavit")


if __name__ == "__main__":
    main()
