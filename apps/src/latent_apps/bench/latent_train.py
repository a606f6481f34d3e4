"""`bench latent-train`: one training step (forward + backward) of K continuous latents with LaViT's gate and the
attention recorder active: our KV-cached loop (``forward_with_latents``) vs Coconut's K + 1 full passes.

Random LlamaForCausalLM (4 layers, hidden 256, 8 query heads sharing 2 KV heads), batch 2 x 512 prompt tokens (the
second prompt left padded by 64 positions; the first half of each prompt's real tokens stands in for the image
keys), K = 4 latents, one end token, 16 answer tokens. Both paths compute the same loss: the answer's next-token
loss plus a loss on the recorded attention rows of the answer over the image keys (LaViT's L_traj), with the gate
(bias ln 0.3, LaViT Eq. 4) on every latent, end and answer query over the image keys. Coconut's pass t runs the
whole prompt + z_1..z_{t-1} to get z_t, and pass K + 1 the whole sequence with the answer (the recorder is on in
that pass only); ours prefills once, runs K - 1 single-position steps on the KV cache and the answer in one
forward on it. Metrics (the usual JSON record on the last line with ``--json``):

- ``time_ratio`` = ours / Coconut seconds per step (goal <= 0.5);
- ``peak_mem_ratio`` = ours / Coconut peak bytes of the step (goal <= 0.7);
- ``max_grad_diff`` = max |difference| of every parameter's gradient (goal <= 1e-4; fp32), and ``loss_diff``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from latent_core.attention import attention_bias, gate_bias, record_attention
from latent_core.latents import forward_with_latents

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

GOALS = {"time_ratio": 0.5, "peak_mem_ratio": 0.7, "max_grad_diff": 1e-4}
VOCAB = 1024


def run(
    as_json: bool = False,
    prompt_tokens: int = 512,
    num_latents: int = 4,
    answer_tokens: int = 16,
    batch: int = 2,
    pad: int = 64,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 8,
    kv_heads: int = 2,
    repeats: int = 3,
    device: str = "auto",
) -> dict[str, Any]:
    """Run the benchmark, print the table (and with ``as_json`` the JSON record as the last line); return it.

    The keyword arguments shrink the configuration for tests; the defaults are the benchmark's."""
    where = bench_device(device)
    model = random_llama(layers, hidden, heads, kv_heads=kv_heads, vocab=VOCAB).to(where).train()
    ids, mask = left_padded(batch, prompt_tokens, min(pad, prompt_tokens // 2), VOCAB, where)
    end = [VOCAB - 1]
    answer = torch.randint(0, VOCAB, (batch, answer_tokens), generator=torch.Generator().manual_seed(1)).to(where)
    total = prompt_tokens + num_latents + len(end) + answer_tokens
    real = torch.cat([mask, mask.new_ones((batch, total - prompt_tokens))], 1).bool()
    first_real = (mask == 0).sum(-1, keepdim=True)
    columns = torch.arange(total, device=where)[None]
    keys = real & (columns >= first_real) & (columns < first_real + (prompt_tokens - first_real) // 2)
    gated = columns.expand(batch, -1) >= prompt_tokens  # latents, end and answer queries
    answer_rows = columns.expand(batch, -1) >= total - answer_tokens
    bias = gate_bias(0.3)

    def traj_loss(recorder) -> torch.Tensor:
        return sum(w.square().sum() for w in recorder.weights)

    def ours() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with attention_bias(model, gated, keys, bias), record_attention(model, answer_rows, keys) as recorder:
            out = forward_with_latents(
                model, {"input_ids": ids, "attention_mask": mask}, num_latents, labels=answer, end_ids=end,
                answer_ids=answer,
            )  # fmt: skip
            loss = out.loss + traj_loss(recorder)
        loss.backward()
        return loss.detach()

    def coconut() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        embed = model.get_input_embeddings()
        seq, seq_mask = embed(ids), mask
        with attention_bias(model, gated, keys, bias):
            for _ in range(num_latents):
                positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
                out = model.model(inputs_embeds=seq, attention_mask=seq_mask, position_ids=positions)
                seq = torch.cat([seq, out.last_hidden_state[:, -1:]], 1)
                seq_mask = torch.cat([seq_mask, seq_mask.new_ones((batch, 1))], 1)
            tail = torch.cat([torch.tensor(end, device=where).expand(batch, -1), answer[:, :-1]], 1)
            seq = torch.cat([seq, embed(tail)], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(tail)], 1)
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            with record_attention(model, answer_rows, keys) as recorder:
                out = model.model(inputs_embeds=seq, attention_mask=seq_mask, position_ids=positions)
            predicting = out.last_hidden_state[:, total - answer_tokens - 1 : total - 1]
            logits = model.lm_head(predicting).float()
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), answer.reshape(-1)) + traj_loss(recorder)
        loss.backward()
        return loss.detach()

    def grads() -> list[torch.Tensor | None]:
        return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]

    loss_ours = ours()
    grads_ours = grads()
    loss_coconut = coconut()
    grads_coconut = grads()
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(grads_ours, grads_coconut, strict=True) if a is not None)
    assert all((a is None) == (b is None) for a, b in zip(grads_ours, grads_coconut, strict=True))
    t_ours, t_coconut, _, _ = timed_pair(ours, coconut, repeats=repeats)
    model.zero_grad(set_to_none=True)  # the step's own zero_grad then frees nothing allocated before the count
    mem_ours, _ = peak_memory(ours, where)
    model.zero_grad(set_to_none=True)
    mem_coconut, _ = peak_memory(coconut, where)
    model.zero_grad(set_to_none=True)
    record = {
        "bench": "latent-train",
        "config": {
            "prompt_tokens": prompt_tokens,
            "num_latents": num_latents,
            "answer_tokens": answer_tokens,
            "batch": batch,
            "pad": int((mask == 0).sum()),
            "layers": layers,
            "hidden": hidden,
            "heads": heads,
            "kv_heads": kv_heads,
            "repeats": repeats,
        },  # fmt: skip
        "device": str(where),
        "ours_s": t_ours,
        "coconut_s": t_coconut,
        "ours_peak_bytes": mem_ours,
        "coconut_peak_bytes": mem_coconut,
        "time_ratio": ratio(t_ours, t_coconut),
        "peak_mem_ratio": ratio(mem_ours, mem_coconut),
        "max_grad_diff": grad_diff,
        "loss_diff": float((loss_ours - loss_coconut).abs()),
    }
    table = [
        ("time_ratio (ours / Coconut K+1 passes)", fmt_ratio(record["time_ratio"]), f"<= {GOALS['time_ratio']}"),
        ("peak_mem_ratio", fmt_ratio(record["peak_mem_ratio"]), f"<= {GOALS['peak_mem_ratio']}"),
        ("max_grad_diff", f"{grad_diff:.1e}", f"<= {GOALS['max_grad_diff']:.0e}"),
        ("loss_diff", f"{record['loss_diff']:.1e}", "~0"),
        ("ours / Coconut seconds", f"{t_ours:.3f} / {t_coconut:.3f}", ""),
        ("ours / Coconut peak MiB", f"{mem_ours / 2**20:.1f} / {mem_coconut / 2**20:.1f}", ""),
    ]
    title = (
        f"latent-train: batch {batch} (padded) x {prompt_tokens} prompt tokens, K={num_latents}, {answer_tokens} "
        f"answer tokens, gate + recorder, {layers} layers"
    )
    report(title, table, record, as_json)
    return record
