"""`bench gating`: a forward (and a forward + backward) under `attention_bias` vs the same model's plain SDPA.

Random LlamaForCausalLM (4 layers, hidden 256, 8 query heads sharing 2 KV heads: grouped-query attention as in
Qwen2.5 / Llama-3), batch 2 x 1024 tokens, the second sample left padded by 256 positions; half the keys gated
(bias ln(1e-3)) for the last quarter of the queries, as LaViT's curriculum gate does for response tokens over image
keys. Only the gated rows take the explicit-mask path. Metrics:

- ``time_ratio``: gated / plain forward (inference), goal <= 1.15;
- ``backward_time_ratio``: gated / plain training step (forward + backward of the mean logit), goal <= 1.15;
- ``ungated_rows_max_diff``: the rows the gate does not touch equal the plain forward's (~0).
"""

from __future__ import annotations

from typing import Any

import torch
from latent_core.attention import attention_bias, gate_bias

from latent_apps.bench.common import bench_device, fmt_ratio, left_padded, random_llama, ratio, report, timed_pair

GOAL = 1.15


def run(
    as_json: bool = False,
    tokens: int = 1024,
    batch: int = 2,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 8,
    kv_heads: int = 2,
    pad: int = 256,
    repeats: int = 7,
    device: str = "auto",
) -> dict[str, Any]:
    where = bench_device(device)
    model = random_llama(layers, hidden, heads, kv_heads=kv_heads).to(where)
    ids, mask = left_padded(batch, tokens, min(pad, tokens // 2), 1024, where)
    queries = torch.zeros(batch, tokens, dtype=torch.bool, device=where)
    queries[:, -tokens // 4 :] = True
    keys = torch.zeros(batch, tokens, dtype=torch.bool, device=where)
    keys[:, : tokens // 2] = True
    bias = gate_bias(1e-3)

    def plain():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).logits

    def gated():
        with torch.inference_mode(), attention_bias(model, queries, keys, bias):
            return model(input_ids=ids, attention_mask=mask).logits

    def plain_step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask).logits.mean().backward()

    def gated_step():
        model.zero_grad(set_to_none=True)
        with attention_bias(model, queries, keys, bias):
            model(input_ids=ids, attention_mask=mask).logits.mean().backward()

    t_gated, t_plain, logits_gated, logits_plain = timed_pair(gated, plain, repeats=repeats)
    t_gated_step, t_plain_step, _, _ = timed_pair(gated_step, plain_step, repeats=max(repeats // 2, 1))
    model.zero_grad(set_to_none=True)
    ungated = ~queries[0]
    real = mask.bool()[:, ungated]  # padding rows are not compared (nothing attends from them)
    diff = (logits_gated[:, ungated] - logits_plain[:, ungated]).abs().amax(-1)[real]
    record = {
        "bench": "gating",
        "config": {
            "tokens": tokens,
            "batch": batch,
            "layers": layers,
            "hidden": hidden,
            "heads": heads,
            "kv_heads": kv_heads,
            "pad": int((mask == 0).sum()),
        },  # fmt: skip
        "device": str(where),
        "plain_s": t_plain,
        "gated_s": t_gated,
        "time_ratio": ratio(t_gated, t_plain),
        "plain_step_s": t_plain_step,
        "gated_step_s": t_gated_step,
        "backward_time_ratio": ratio(t_gated_step, t_plain_step),
        "ungated_rows_max_diff": float(diff.max()),
    }
    table = [
        ("time_ratio (gated / plain forward)", fmt_ratio(record["time_ratio"]), f"<= {GOAL}"),
        ("backward_time_ratio (forward + backward)", fmt_ratio(record["backward_time_ratio"]), f"<= {GOAL}"),
        ("gated / plain seconds", f"{t_gated:.4f} / {t_plain:.4f}", ""),
        ("gated / plain step seconds", f"{t_gated_step:.4f} / {t_plain_step:.4f}", ""),
        ("max |diff| on ungated rows", f"{record['ungated_rows_max_diff']:.1e}", "~0"),
    ]
    title = f"gating: batch {batch} x {tokens} tokens (padded), {layers} layers, {heads}/{kv_heads} heads"
    report(title, table, record, as_json)
    return record
