"""The extractor (Section 3.1 Eq. 3-5, Appendix B): a small Transformer that turns the LLM's state at the current
position into the latent token z_t by cross-attending to the refocused window V_local.

Per iteration t:

1. **Query** (**choice**, ``query="layers"``): the hidden states of every layer at the current position, mixed with
   learned softmax weights (initialised uniform), then layer-normed: q_t. ``query="last"`` takes the final-norm
   state alone.
2. **Latent-state sequence**: q_1..q_t, the queries of every iteration so far (**choice**).
3. **Layers** (Appendix B: 2): a linear pre-processing, causal multi-head self-attention over the sequence
   (12 heads: "internal logic modelling"), multi-head cross-attention from it to V_local (12 heads: "cross-modal
   refocusing"), each with a pre-norm and a residual connection; hidden 1536.
4. **Synthesis** (Eq. 5): the last position through a GLU and an FFN (Linear, GELU, Linear) into the LLM's input
   embedding width: z_t.

Every position is recomputed at each iteration (the sequence is at most T long) and cross-attends to the current
V_local.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lare.config import LareConfig

__all__ = ["EXTRACTOR_WEIGHTS", "Extractor", "ExtractorLayer"]

EXTRACTOR_WEIGHTS = "lare_extractor.safetensors"


class ExtractorLayer(nn.Module):
    """One extractor layer: linear pre-processing, causal self-attention over the latent-state sequence, then
    cross-attention to V_local, each pre-normed with a residual (Appendix B)."""

    def __init__(self, d_in: int, hidden: int, heads: int, d_vision: int) -> None:
        super().__init__()
        self.pre = nn.Linear(d_in, hidden)
        self.self_norm = nn.LayerNorm(hidden)
        self.self_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(hidden)
        self.cross_attn = nn.MultiheadAttention(hidden, heads, kdim=d_vision, vdim=d_vision, batch_first=True)

    def forward(self, x: Tensor, v_local: Tensor) -> Tensor:
        x = self.pre(x)
        h = self.self_norm(x)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.self_attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = self.cross_norm(x)
        return x + self.cross_attn(h, v_local, v_local, need_weights=False)[0]


class Extractor(nn.Module):
    """The extractor of Appendix B (see the module docstring).

    Args:
        d_model: the LLM's hidden width (the query's).
        n_hidden_states: how many hidden states the LLM returns (embedding output + one per decoder layer).
        d_vision: the width of V_local (projector output = the LLM's width in llava).
        d_embed: the LLM's input-embedding width (z_t's).
        config: layers, heads, hidden width and query mode.
    """

    def __init__(self, d_model: int, n_hidden_states: int, d_vision: int, d_embed: int, config: LareConfig) -> None:
        super().__init__()
        self.query_mode = config.query
        self.layer_logits = nn.Parameter(torch.zeros(n_hidden_states)) if config.query == "layers" else None
        self.query_norm = nn.LayerNorm(d_model)
        hidden, heads = config.extractor_hidden, config.extractor_heads
        self.layers = nn.ModuleList(
            ExtractorLayer(d_model if i == 0 else hidden, hidden, heads, d_vision)
            for i in range(config.extractor_layers)
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.glu = nn.Linear(hidden, 2 * hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, d_embed))

    @classmethod
    def for_model(cls, vlm: nn.Module | Any, config: LareConfig) -> Extractor:
        """An extractor sized for the llava ``vlm`` or its config (its language model's width and depth)."""
        text = getattr(vlm, "config", vlm).get_text_config()
        d = text.hidden_size
        return cls(d, text.num_hidden_layers + 1, d, d, config)

    def query(self, hidden_states: Sequence[Tensor] | None, hidden: Tensor) -> Tensor:
        """q_t ``[B, d]`` from every layer's state at the current position (``hidden_states``, each ``[B, d]``) or,
        with ``query="last"``, from the final-norm state ``hidden``."""
        if self.layer_logits is None:
            return self.query_norm(hidden)
        if hidden_states is None or len(hidden_states) != self.layer_logits.shape[0]:
            got = None if hidden_states is None else len(hidden_states)
            raise ValueError(f"the extractor mixes {self.layer_logits.shape[0]} hidden states, got {got}")
        weights = self.layer_logits.softmax(0).to(hidden_states[0].dtype)
        mixed = torch.einsum("l,lbd->bd", weights, torch.stack(tuple(hidden_states)))
        return self.query_norm(mixed)

    def forward(self, states: Tensor, v_local: Tensor) -> Tensor:
        """z_t ``[B, d_embed]`` from the latent-state sequence ``states [B, t, d_model]`` (q_1..q_t) and
        ``v_local [B, m, d_vision]``."""
        x = states
        for layer in self.layers:
            x = layer(x, v_local)
        last = self.out_norm(x[:, -1])
        return self.ffn(F.glu(self.glu(last), dim=-1))
