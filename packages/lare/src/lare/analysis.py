"""Attention analysis (Table 5, METHODS.md section 3): how much the first generated token attends to the image.

For each sample, the attention of the position that predicts the first answer token over the visual tokens (the
sum over the image keys of the softmax row, mean over heads and layers, :func:`latent_core.record_attention`): for
a LaRe model the ``<eot>`` position after ``[V, X_q, <bot>, z_1..z_T]`` (one teacher-forced pass over the latents
its own greedy run produced, no halting), for a plain llava model (e.g. the CoT-fine-tuned control) the last prompt
position. Two models' per-sample values on the same inputs are compared with Welch's t-test and the Mann-Whitney U
test (scipy), and drawn as two distributions in a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["compare_distributions", "first_token_visual_attention", "plot_distributions"]


@torch.no_grad()
def first_token_visual_attention(model: Any, processor: Any, images: list[Any], questions: list[str]) -> Tensor:
    """``[B]``: each sample's attention mass on the image tokens from the position that predicts its first answer
    token (see the module docstring); ``model`` is a :class:`lare.model.LareModel` or a plain llava model."""
    from latent_core.attention import record_attention
    from latent_core.capture import capture_image_features
    from latent_core.families import image_token_mask, model_parts

    from lare.generate import encode_questions, generate_answers
    from lare.model import LareModel

    lare = model if isinstance(model, LareModel) else None
    vlm = lare.vlm if lare is not None else model
    device = next(vlm.parameters()).device
    inputs = encode_questions(processor, images, questions, device)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, prompt_len = ids.shape
    parts = model_parts(vlm)
    with capture_image_features(vlm, ids) as captured:  # the prompt's embeddings with the image features merged in
        vlm.model(**inputs)
    embeds = parts.input_embeddings(ids).clone()
    image = image_token_mask(vlm, ids)
    for b in range(batch):
        embeds[b, image[b]] = captured.features[b].to(embeds.dtype)
    tail = []
    if lare is not None:
        latents = generate_answers(lare, processor, images, questions, 1, halt="none").latents.to(embeds.dtype)
        bot, eot = (parts.input_embeddings(torch.tensor([t], device=device)) for t in (lare.bot_id, lare.eot_id))
        tail = [bot.expand(batch, 1, -1), latents, eot.expand(batch, 1, -1)]
    sequence = torch.cat([embeds, *tail], 1)
    total = sequence.shape[1]
    full_mask = torch.cat([mask, mask.new_ones((batch, total - prompt_len))], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    queries = torch.zeros((batch, total), dtype=torch.bool, device=device)
    queries[:, -1] = True
    keys = F.pad(image, (0, total - prompt_len))
    with record_attention(vlm, queries, keys) as recorder:
        parts.language_model(inputs_embeds=sequence, attention_mask=full_mask, position_ids=positions)
    return torch.stack([rows[-1].sum() for rows in recorder.weights]).float().cpu()


def compare_distributions(a: Tensor, b: Tensor) -> dict[str, float]:
    """Welch's t-test and the two-sided Mann-Whitney U test of two samples of per-sample values."""
    from scipy import stats

    x, y = a.double().numpy(), b.double().numpy()
    t = stats.ttest_ind(x, y, equal_var=False)
    u = stats.mannwhitneyu(x, y, alternative="two-sided")
    return {
        "mean_a": float(x.mean()), "mean_b": float(y.mean()), "t": float(t.statistic), "t_p": float(t.pvalue),
        "u": float(u.statistic), "u_p": float(u.pvalue),
    }  # fmt: skip


def plot_distributions(values: dict[str, Tensor], path: str | Path) -> None:
    """The per-sample values of each model as overlaid histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5, 3.2))
    for name, v in values.items():
        axis.hist(v.numpy(), bins=20, alpha=0.5, label=f"{name} (mean {float(v.mean()):.3f})")
    axis.set_xlabel("first answer token's attention on the image")
    axis.set_ylabel("samples")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
