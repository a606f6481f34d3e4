"""`uv run apps/cli <command>`: the same app as the installed `latent` console script."""

from latent_apps.cli import main

if __name__ == "__main__":  # not when a spawned worker (reproduce --jobs) re-imports this file
    main()
