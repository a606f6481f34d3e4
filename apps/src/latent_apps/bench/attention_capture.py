"""`bench attention-capture`: `record_attention` of 32 query rows vs eager `output_attentions=True`.

Both on one random LlamaForCausalLM (8 layers, hidden 256, 8 query heads sharing 2 KV heads, Llama's 8/3 MLP ratio)
in one process, batch 2 x 2048 tokens, the second sample left padded by 512 positions. The eager baseline is how the
LaViT authors extracted attention (all L x L maps of every layer); ours computes only the selected rows next to the
SDPA forward. Two modes:

- inference: ``peak_mem_ratio`` (goal <= 0.3), ``time_ratio`` (goal <= 0.7), ``max_abs_diff`` between the recorded
  rows and the same rows of the eager maps (goal <= 1e-5);
- training (the rows with gradients, LaViT's L_traj): a forward and the backward of a loss on the rows:
  ``train_peak_mem_ratio`` (goal <= 0.3), ``train_time_ratio`` (goal <= 0.7) and ``max_grad_diff`` between the two
  paths' parameter gradients (goal <= 1e-5).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from latent_core.attention import record_attention

from latent_apps.bench.common import (
    bench_device,
    fmt_ratio,
    left_padded,
    peak_memory,
    random_llama,
    ratio,
    report,
    timed_pair,
)

GOALS = {"peak_mem_ratio": 0.3, "time_ratio": 0.7, "max_abs_diff": 1e-5, "max_grad_diff": 1e-5}


def run(
    as_json: bool = False,
    tokens: int = 2048,
    batch: int = 2,
    layers: int = 8,
    hidden: int = 256,
    heads: int = 8,
    kv_heads: int = 2,
    pad: int = 512,
    rows: int = 32,
    repeats: int = 3,
    device: str = "auto",
) -> dict[str, Any]:
    where = bench_device(device)
    model = random_llama(layers, hidden, heads, kv_heads=kv_heads).to(where)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids, mask = left_padded(batch, tokens, min(pad, tokens // 2), 1024, where)
    queries = torch.zeros(batch, tokens, dtype=torch.bool, device=where)
    queries[:, -rows:] = True
    keys = mask.bool()  # every real key

    def ours_rows(grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad), record_attention(model, queries, keys) as recorder:
            model(input_ids=ids, attention_mask=mask)
        return torch.stack([torch.nn.functional.pad(w, (tokens - w.shape[-1], 0)) for w in recorder.weights])

    def eager_rows(grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            attentions = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        return torch.stack([a[:, :, -rows:] for a in attentions]).mean(0).mean(1)  # [B, rows, tokens]

    def ours():
        with torch.inference_mode():
            return ours_rows(False)

    def baseline():
        with torch.inference_mode():
            return eager_rows(False)

    def ours_step():
        model.zero_grad(set_to_none=True)
        _loss(ours_rows(True)).backward()

    def eager_step():
        eager.zero_grad(set_to_none=True)
        _loss(eager_rows(True)).backward()

    t_ours, t_base, rows_ours, rows_base = timed_pair(ours, baseline, repeats=repeats)
    mem_ours, _ = peak_memory(ours, where)
    mem_base, _ = peak_memory(baseline, where)
    t_ours_step, t_base_step, _, _ = timed_pair(ours_step, eager_step, repeats=repeats)
    grad_diff = _max_grad_diff(model, eager)
    model.zero_grad(set_to_none=True)
    eager.zero_grad(set_to_none=True)
    mem_ours_step, _ = peak_memory(ours_step, where)
    mem_base_step, _ = peak_memory(eager_step, where)
    model.zero_grad(set_to_none=True)
    eager.zero_grad(set_to_none=True)
    real = mask.bool()[:, None, :].expand_as(rows_base)
    record = {
        "bench": "attention-capture",
        "config": {
            "tokens": tokens,
            "batch": batch,
            "layers": layers,
            "hidden": hidden,
            "heads": heads,
            "kv_heads": kv_heads,
            "pad": int((mask == 0).sum()),
            "rows": rows,
        },  # fmt: skip
        "device": str(where),
        "ours_s": t_ours,
        "eager_s": t_base,
        "ours_peak_bytes": mem_ours,
        "eager_peak_bytes": mem_base,
        "time_ratio": ratio(t_ours, t_base),
        "peak_mem_ratio": ratio(mem_ours, mem_base),
        "max_abs_diff": float((rows_ours - rows_base)[real].abs().max()),
        "ours_train_s": t_ours_step,
        "eager_train_s": t_base_step,
        "ours_train_peak_bytes": mem_ours_step,
        "eager_train_peak_bytes": mem_base_step,
        "train_time_ratio": ratio(t_ours_step, t_base_step),
        "train_peak_mem_ratio": ratio(mem_ours_step, mem_base_step),
        "max_grad_diff": grad_diff,
    }
    table = [
        ("time_ratio (ours / eager)", fmt_ratio(record["time_ratio"]), f"<= {GOALS['time_ratio']}"),
        ("peak_mem_ratio (ours / eager)", fmt_ratio(record["peak_mem_ratio"]), f"<= {GOALS['peak_mem_ratio']}"),
        ("max_abs_diff", f"{record['max_abs_diff']:.2e}", f"<= {GOALS['max_abs_diff']}"),
        ("train_time_ratio (forward + backward)", fmt_ratio(record["train_time_ratio"]), f"<= {GOALS['time_ratio']}"),
        ("train_peak_mem_ratio", fmt_ratio(record["train_peak_mem_ratio"]), f"<= {GOALS['peak_mem_ratio']}"),
        ("max_grad_diff", f"{grad_diff:.2e}", f"<= {GOALS['max_grad_diff']}"),
        (
            "ours / eager seconds (inference, train)",
            f"{t_ours:.3f} / {t_base:.3f}, {t_ours_step:.3f} / {t_base_step:.3f}",
            "",
        ),  # fmt: skip
        (
            "ours / eager peak MiB (inference, train)",
            f"{mem_ours / 2**20:.1f} / {mem_base / 2**20:.1f}, "
            f"{mem_ours_step / 2**20:.1f} / {mem_base_step / 2**20:.1f}",
            "",
        ),  # fmt: skip
    ]
    title = f"attention-capture: {rows} rows of batch {batch} x {tokens} tokens (padded), {layers} layers, GQA"
    report(title, table, record, as_json)
    return record


def _max_grad_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Max |difference| of the two models' parameter gradients (a missing gradient counts as zeros; the head and
    the final norm get none from a loss on attention rows)."""
    diff = 0.0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        if p.grad is None and q.grad is None:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(q.grad)
        h = q.grad if q.grad is not None else torch.zeros_like(p.grad)
        diff = max(diff, float((g - h).abs().max()))
    return diff


def _loss(rows: torch.Tensor) -> torch.Tensor:
    """A loss on the recorded rows (as L_traj is): their squared sum, so every row's gradient differs."""
    return rows.square().sum()
