"""`bench latent-loop`: `generate_with_latents` (prefill once, one cached single-position forward per latent, then
`generate` on the cache) vs Coconut's loop, in three comparisons.

Random LlamaForCausalLM (4 layers, hidden 256, 4 heads, intermediate 1024, vocabulary 32000), batch 2 (the second
prompt left padded by 64 positions), a 512-token prompt, 8 latents, 32 answer tokens. Baselines:

- *Coconut* as the reference code runs it: a full forward over prompt + latents so far for every latent, and a full
  recompute of the whole sequence for every greedy answer token (no cache);
- *Coconut latents + cached generate*: the same latent phase, then ordinary cached ``generate`` from the embeddings
  (the fair end-to-end baseline: most of the first speedup comes from Coconut decoding answers without a cache);
- the *latent phase alone*: Coconut's K full forwards vs our prefill + K - 1 cached single-position steps
  (``forward_with_latents`` without an answer).

Metrics:

- ``speedup`` = Coconut seconds / ours (goal >= 5); ``speedup_vs_cached_generate`` = (Coconut latents + cached
  generate) / ours (goal >= 1.5); ``latent_phase_speedup`` (goal >= 4);
- ``step_cost_ratio`` = one latent step / one ordinary decode step of `generate` on the cache (goal <= 1.3), each
  the median interval between successive calls of a hook called once per step: the ``step_fn`` for latent steps (an
  identity that records the time), a pass-through logits processor for decode steps. An interval holds everything
  a step does (the forward on the cache and all bookkeeping; for decode also ``lm_head``, logits processing and
  stopping checks); medians of many intervals shrug off load spikes;
- ``max_latent_diff`` = max |our latents - Coconut's| (goal <= 1e-4), and whether the answer tokens of all three
  agree.

Timings are single-threaded by default (``threads=1``, restored afterwards): on a shared machine, torch's intra-op
threads make single-token steps wait on descheduled threads (measured on a loaded 2-core box: one cached step of
this model took 3 ms with 1 thread and 8-56 ms with 2), which buries both metrics in noise. Pass ``threads=None``
to keep torch's setting; the record says which was used.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from latent_core.latents import LatentState, forward_with_latents, generate_with_latents
from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from latent_apps.bench.common import bench_device, left_padded, random_llama, report, sync

SPEEDUP_GOAL = 5.0
CACHED_GENERATE_GOAL = 1.5
LATENT_PHASE_GOAL = 4.0
STEP_COST_GOAL = 1.3
LATENT_DIFF_GOAL = 1e-4


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> tuple[dict[str, float], dict]:
    """Median seconds of each function, run in turns (so load drifts hit all alike), and their last results."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def _intervals(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _coconut_latents(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor, num_latents: int):
    """Coconut's latent phase: every latent re-runs the whole prompt + latents so far (no KV cache). Returns the
    latents and the sequence's embeddings, mask and positions (left padding: positions count real tokens)."""
    seq = model.get_input_embeddings()(ids)
    latents = []
    for _ in range(num_latents):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.model(inputs_embeds=seq, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1]
        latents.append(hidden)
        seq = torch.cat([seq, hidden[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
    return torch.stack(latents, 1), seq, mask


def _naive(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor, num_latents: int, new_tokens: int):
    """Coconut: every latent and every answer token re-runs the whole sequence (no KV cache)."""
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        latents, seq, mask = _coconut_latents(model, ids, mask, num_latents)
        tokens = []
        for _ in range(new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model.model(inputs_embeds=seq, attention_mask=mask, position_ids=positions)
            token = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
            tokens.append(token)
            seq = torch.cat([seq, embed(token)[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
    return latents, torch.stack(tokens, 1)


def _coconut_cached(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor, num_latents: int, new_tokens: int):
    """Coconut's latent phase, then ordinary cached ``generate`` from the embeddings (greedy)."""
    with torch.inference_mode():
        latents, seq, mask = _coconut_latents(model, ids, mask, num_latents)
        tokens = model.generate(
            inputs_embeds=seq, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False,
        )  # fmt: skip
    return latents, tokens


def run(
    as_json: bool = False,
    prompt_tokens: int = 512,
    num_latents: int = 8,
    answer_tokens: int = 32,
    batch: int = 2,
    pad: int = 64,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    intermediate: int = 1024,
    vocab: int = 32000,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = 1,
    device: str = "auto",
) -> dict[str, Any]:
    """Run the benchmark, print the table (and with ``as_json`` the JSON record as the last line); return the record.

    The keyword arguments shrink the configuration for tests; the defaults are the benchmark's.
    """
    if num_latents < 2 or answer_tokens < 2:
        raise ValueError("step costs are intervals between steps: need num_latents >= 2 and answer_tokens >= 2")
    where = bench_device(device)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(
            as_json,
            prompt_tokens,
            num_latents,
            answer_tokens,
            batch,
            pad,
            layers,
            hidden,
            heads,
            intermediate,
            vocab,
            repeats,
            warmup,
            where,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    as_json: bool,
    prompt_tokens: int,
    num_latents: int,
    answer_tokens: int,
    batch: int,
    pad: int,
    layers: int,
    hidden: int,
    heads: int,
    intermediate: int,
    vocab: int,
    repeats: int,
    warmup: int,
    where: torch.device,
) -> dict[str, Any]:
    model = random_llama(
        layers,
        hidden,
        heads,
        intermediate,
        vocab,
        max_position_embeddings=max(2048, prompt_tokens + num_latents + answer_tokens),
        eos_token_id=None,  # never stop early: every run decodes exactly the tokens asked for
        bos_token_id=None,
        pad_token_id=None,
    )
    model.generation_config.eos_token_id = None
    model.to(where)
    ids, mask = left_padded(batch, prompt_tokens, min(pad, prompt_tokens // 2), vocab, where)
    inputs = {"input_ids": ids, "attention_mask": mask}

    latent_stamps: list[list[float]] = []
    decode_stamps: list[list[float]] = []

    def stamp_step(hidden: torch.Tensor, state: LatentState) -> torch.Tensor:
        sync()  # on CUDA the stamp must follow the queued work
        latent_stamps[-1].append(time.perf_counter())
        return hidden  # the identity: Coconut's continuous thought

    class StampDecode(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            sync()
            decode_stamps[-1].append(time.perf_counter())
            return scores

    def ours():
        latent_stamps.append([])
        decode_stamps.append([])
        with torch.inference_mode():
            return generate_with_latents(
                model,
                inputs,
                num_latents,
                step_fn=stamp_step,
                max_new_tokens=answer_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([StampDecode()]),
            )

    def ours_latents():
        with torch.inference_mode():
            return forward_with_latents(model, inputs, num_latents).latents

    def coconut_latents():
        with torch.inference_mode():
            return _coconut_latents(model, ids, mask, num_latents)[0]

    times, results = _interleaved({"ours": ours}, repeats=repeats, warmup=warmup)
    # The baselines take seconds per run and vary little: up to 3 runs (the first forward shapes are warm by now).
    more_times, more_results = _interleaved(
        {
            "naive": lambda: _naive(model, ids, mask, num_latents, answer_tokens),
            "coconut_cached_generate": lambda: _coconut_cached(model, ids, mask, num_latents, answer_tokens),
            "ours_latent_phase": ours_latents,
            "coconut_latent_phase": coconut_latents,
        },
        repeats=min(repeats, 3),
        warmup=1,
    )
    times.update(more_times)
    results.update(more_results)
    t_ours, t_naive = times["ours"], times["naive"]
    # Intervals between successive hook calls, from the timed runs only (warm-up runs left out).
    latent_step = statistics.median(d for run in latent_stamps[warmup:] for d in _intervals(run))
    decode_step = statistics.median(d for run in decode_stamps[warmup:] for d in _intervals(run))
    naive_latents, naive_tokens = results["naive"]
    got = results["ours"]
    record = {
        "bench": "latent-loop",
        "config": {
            "prompt_tokens": prompt_tokens,
            "num_latents": num_latents,
            "answer_tokens": answer_tokens,
            "batch": batch,
            "pad": int((mask == 0).sum()),
            "layers": layers,
            "hidden": hidden,
            "heads": heads,
            "intermediate": intermediate,
            "vocab": vocab,
            "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
        },
        "device": str(where),
        "ours_s": t_ours,
        "naive_s": t_naive,
        "speedup": t_naive / t_ours,
        "speedup_vs_cached_generate": times["coconut_cached_generate"] / t_ours,
        "latent_phase_speedup": times["coconut_latent_phase"] / times["ours_latent_phase"],
        "latent_step_s": latent_step,
        "decode_step_s": decode_step,
        "step_cost_ratio": latent_step / decode_step,
        "max_latent_diff": float((got.latents - naive_latents).abs().max()),
        "tokens_match": bool(torch.equal(got.sequences, naive_tokens))
        and bool(torch.equal(results["coconut_cached_generate"][1], naive_tokens)),
        "latent_phase_max_diff": float((results["ours_latent_phase"] - results["coconut_latent_phase"]).abs().max()),
        "timings_s": times,
    }
    table = [
        ("speedup (Coconut / ours)", f"{record['speedup']:.1f}x", f">= {SPEEDUP_GOAL}"),
        (
            "speedup_vs_cached_generate (Coconut latents + cached generate / ours)",
            f"{record['speedup_vs_cached_generate']:.2f}x",
            f">= {CACHED_GENERATE_GOAL}",
        ),  # fmt: skip
        (
            "latent_phase_speedup (Coconut latents / ours)",
            f"{record['latent_phase_speedup']:.2f}x",
            f">= {LATENT_PHASE_GOAL}",
        ),  # fmt: skip
        (
            "Coconut / + cached generate / ours seconds",
            f"{t_naive:.3f} / {times['coconut_cached_generate']:.3f} / {t_ours:.3f}",
            "",
        ),  # fmt: skip
        ("step_cost_ratio (latent / decode)", f"{record['step_cost_ratio']:.2f}", f"<= {STEP_COST_GOAL}"),
        ("latent / decode step ms", f"{latent_step * 1e3:.2f} / {decode_step * 1e3:.2f}", ""),
        ("max_latent_diff", f"{record['max_latent_diff']:.1e}", f"<= {LATENT_DIFF_GOAL:.0e}"),
        ("answer tokens match both baselines", str(record["tokens_match"]), "True"),
    ]
    title = (
        f"latent-loop: batch {batch} (padded), prompt {prompt_tokens}, {num_latents} latents, {answer_tokens} answer "
        f"tokens, {layers} layers"
    )
    report(title, table, record, as_json)
    return record
