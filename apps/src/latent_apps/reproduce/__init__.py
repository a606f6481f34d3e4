"""Reproductions of the papers' claims at CPU scale, on the synthetic shapes task, from the shipped bases
(``data/base``): one command per method, each writing ``results.json``, a markdown table, a plot, and one JSON
record on its last stdout line.

- :mod:`latent_apps.reproduce.heima`: ``latent reproduce heima``;
- :mod:`latent_apps.reproduce.lavit`: ``latent reproduce lavit``;
- :mod:`latent_apps.reproduce.lare`: ``latent reproduce lare``;
- :mod:`latent_apps.reproduce.common`: what they share (base paths, progress lines, the settings check, slugs,
  evaluation rows).
"""
