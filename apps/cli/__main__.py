"""`uv run apps/cli <command>`: the same app as the installed `latent` console script."""

from latent_apps.cli import main

main()
