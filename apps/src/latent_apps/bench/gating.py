"""`bench gating`: a forward under `attention_bias` vs the same model's plain causal SDPA forward.

Random LlamaForCausalLM (4 layers, hidden 256), batch 2 x 1024 tokens; half the keys gated (bias ln(1e-3)) for the
last quarter of the queries, as LaViT's curriculum gate does for response tokens over image keys. Only the gated
rows take the explicit-mask path. Metric: ``time_ratio`` (goal <= 1.15).
"""

from __future__ import annotations

from typing import Any

import torch
from latent_core.attention import attention_bias, gate_bias

from latent_apps.bench.common import bench_device, random_llama, ratio, report, timed_pair

GOAL = 1.15


def run(
    as_json: bool = False,
    tokens: int = 1024,
    batch: int = 2,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    repeats: int = 7,
    device: str = "auto",
) -> dict[str, Any]:
    where = bench_device(device)
    model = random_llama(layers, hidden, heads).to(where)
    ids = torch.randint(0, 1024, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(where)
    queries = torch.zeros(batch, tokens, dtype=torch.bool, device=where)
    queries[:, -tokens // 4 :] = True
    keys = torch.zeros(batch, tokens, dtype=torch.bool, device=where)
    keys[:, : tokens // 2] = True

    def plain():
        with torch.inference_mode():
            return model(input_ids=ids).logits

    def gated():
        with torch.inference_mode(), attention_bias(model, queries, keys, gate_bias(1e-3)):
            return model(input_ids=ids).logits

    t_gated, t_plain, logits_gated, logits_plain = timed_pair(gated, plain, repeats=repeats)
    ungated_rows = ~queries[0]
    record = {
        "bench": "gating",
        "config": {"tokens": tokens, "batch": batch, "layers": layers, "hidden": hidden, "heads": heads},
        "device": str(where),
        "plain_s": t_plain,
        "gated_s": t_gated,
        "time_ratio": ratio(t_gated, t_plain),
        "ungated_rows_max_diff": float((logits_gated[:, ungated_rows] - logits_plain[:, ungated_rows]).abs().max()),
    }
    table = [
        (
            "time_ratio (gated / plain)",
            "n/a" if record["time_ratio"] is None else f"{record['time_ratio']:.3f}",
            f"<= {GOAL}",
        ),  # fmt: skip
        ("gated / plain seconds", f"{t_gated:.4f} / {t_plain:.4f}", ""),
        ("max |diff| on ungated rows", f"{record['ungated_rows_max_diff']:.1e}", "~0"),
    ]
    report(f"gating: batch {batch} x {tokens} tokens, {layers} layers", table, record, as_json)
    return record
