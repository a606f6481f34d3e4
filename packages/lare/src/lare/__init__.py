"""LaRe: multimodal reasoning via latent refocusing."""

__version__ = "0.1.0"
