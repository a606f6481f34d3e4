"""LaViT: aligning latent visual thoughts with a teacher's attention trajectory and visual features."""

__version__ = "0.1.0"
