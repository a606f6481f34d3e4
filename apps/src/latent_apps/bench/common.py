"""Shared helpers of the benchmarks: timing, peak memory, and the table + JSON record every bench prints."""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from latent_core.cli import UserError


def bench_device(name: str = "auto") -> torch.device:
    """The device a bench runs on: ``auto`` = CUDA when available, else CPU; asking for CUDA without one is a user
    error (one line), never a silent CPU run labelled "cuda"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here (use --device cpu or auto)")
    return device


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, ``None`` when the denominator is 0 (nothing was measured)."""
    return numerator / denominator if denominator else None


def sync() -> None:
    """Wait for queued CUDA work, so that wall time measures it (a no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _clocked(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def timed(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> tuple[float, Any]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and the last result (CUDA work
    is waited for)."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        seconds, result = _clocked(fn)
        times.append(seconds)
    return statistics.median(times), result


def timed_pair(
    fast: Callable[[], Any], baseline: Callable[[], Any], repeats: int = 5, warmup: int = 1
) -> tuple[float, float, Any, Any]:
    """Median seconds of ``fast`` and ``baseline``, run alternately (so load drifts hit both alike), and their
    last results."""
    for _ in range(warmup):
        fast(), baseline()
    t_fast, t_base = [], []
    for _ in range(repeats):
        seconds, r_fast = _clocked(fast)
        t_fast.append(seconds)
        seconds, r_base = _clocked(baseline)
        t_base.append(seconds)
    return statistics.median(t_fast), statistics.median(t_base), r_fast, r_base


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[int, Any]:
    """Peak bytes allocated by torch on ``device`` while ``fn()`` runs (above what was live before).

    On a CUDA device: the CUDA allocator's peak statistics. On CPU: torch's profiler memory events, walked in time
    order (each allocation once, at the operator that made it; frees as ``[memory]`` events).
    """
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, result
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # Each allocation counts once, at the innermost operator that made it (self memory); frees are `[memory]`.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, result


def random_llama(
    layers: int,
    hidden: int,
    heads: int,
    intermediate: int | None = None,
    vocab: int = 1024,
    kv_heads: int | None = None,
    **config: Any,
):
    """A random ``LlamaForCausalLM`` in eval mode (seed 0): the benchmarks' model. ``intermediate`` defaults to
    Llama's 8/3 MLP ratio; ``kv_heads`` < ``heads`` gives grouped-query attention (as Qwen2.5 / Llama-3); extra
    keyword arguments go to ``LlamaConfig``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        **{"max_position_embeddings": 8192, **config},
    )
    return LlamaForCausalLM(config).eval()


def left_padded(
    batch: int, tokens: int, pad: int, vocab: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[batch, tokens]`` and their attention mask, the last sample left padded by ``pad`` positions
    (a batch of prompts of different lengths, as a VLM batch is)."""
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1 and pad:
        mask[-1, :pad] = 0
        ids[-1, :pad] = 0
    return ids.to(device), mask.to(device)


def fmt_ratio(value: float | None) -> str:
    """A ratio for a bench table: three decimals, ``n/a`` when nothing was measured (:func:`ratio` gave ``None``)."""
    return "n/a" if value is None else f"{value:.3f}"


def report(title: str, rows: list[tuple[str, str, str]], record: dict[str, Any], as_json: bool) -> None:
    """Print a (metric, value, goal) table, then, with ``as_json``, the record as one JSON line (last line)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("metric", "value", "goal"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=110).print(table)
    if as_json:
        print(json.dumps(record, sort_keys=True))


__all__ = [
    "bench_device",
    "left_padded",
    "peak_memory",
    "random_llama",
    "ratio",
    "report",
    "sync",
    "timed",
    "timed_pair",
]
