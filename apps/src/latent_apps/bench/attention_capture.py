"""`bench attention-capture`: `record_attention` of 32 query rows vs eager `output_attentions=True`.

Both on one random LlamaForCausalLM (8 layers, hidden 256, 4 heads, Llama's 8/3 MLP ratio, 2048 tokens) in one
process. The eager baseline is how the LaViT authors extracted attention (all L x L maps of every layer); ours
computes only the selected rows next to the SDPA forward. Metrics: ``peak_mem_ratio`` (goal <= 0.3),
``time_ratio`` (goal <= 0.7), ``max_abs_diff`` between the recorded rows and the same rows of the eager maps
(goal <= 1e-5).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from latent_core.attention import record_attention

from latent_apps.bench.common import bench_device, peak_memory, random_llama, ratio, report, timed_pair

GOALS = {"peak_mem_ratio": 0.3, "time_ratio": 0.7, "max_abs_diff": 1e-5}


def run(
    as_json: bool = False,
    tokens: int = 2048,
    layers: int = 8,
    hidden: int = 256,
    heads: int = 4,
    rows: int = 32,
    repeats: int = 3,
    device: str = "auto",
) -> dict[str, Any]:
    where = bench_device(device)
    model = random_llama(layers, hidden, heads).to(where)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(0)).to(where)
    queries = torch.zeros(1, tokens, dtype=torch.bool, device=where)
    queries[:, -rows:] = True
    keys = torch.ones(1, tokens, dtype=torch.bool, device=where)

    def ours():
        with torch.inference_mode(), record_attention(model, queries, keys) as recorder:
            model(input_ids=ids)
        return recorder.weights[0]

    def baseline():
        with torch.inference_mode():
            attentions = eager(input_ids=ids, output_attentions=True).attentions
        return torch.stack([a[0, :, -rows:] for a in attentions]).mean(0).mean(0)

    t_ours, t_base, rows_ours, rows_base = timed_pair(ours, baseline, repeats=repeats)
    mem_ours, _ = peak_memory(ours, where)
    mem_base, _ = peak_memory(baseline, where)
    record = {
        "bench": "attention-capture",
        "config": {"tokens": tokens, "layers": layers, "hidden": hidden, "heads": heads, "rows": rows},
        "device": str(where),
        "ours_s": t_ours,
        "eager_s": t_base,
        "ours_peak_bytes": mem_ours,
        "eager_peak_bytes": mem_base,
        "time_ratio": ratio(t_ours, t_base),
        "peak_mem_ratio": ratio(mem_ours, mem_base),
        "max_abs_diff": float((rows_ours - rows_base).abs().max()),
    }
    table = [
        ("time_ratio (ours / eager)", _fmt(record["time_ratio"]), f"<= {GOALS['time_ratio']}"),
        ("peak_mem_ratio (ours / eager)", _fmt(record["peak_mem_ratio"]), f"<= {GOALS['peak_mem_ratio']}"),
        ("max_abs_diff", f"{record['max_abs_diff']:.2e}", f"<= {GOALS['max_abs_diff']}"),
        ("ours / eager seconds", f"{t_ours:.3f} / {t_base:.3f}", ""),
        ("ours / eager peak MiB", f"{mem_ours / 2**20:.1f} / {mem_base / 2**20:.1f}", ""),
    ]
    report(f"attention-capture: {rows} rows of {tokens} tokens, {layers} layers", table, record, as_json)
    return record


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
