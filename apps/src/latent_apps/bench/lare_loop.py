"""`bench lare-loop`: LaRe's T = 4 refocusing iterations on the KV cache vs recomputing the whole prefix at every
iteration (issue 15, item 7).

A random llava (CLIP ViT at 224 px with 14 px patches -> 16x16 = 256 image tokens, an MLP projector, a Qwen2 LLM
with grouped KV heads) and the extractor at its Appendix-B size (2 layers, 12 heads, hidden 1536); a batch of 2
prompts (the second left padded), window 8 of 16. Both paths produce z_1..z_4 and the logits of the first answer
token after ``<eot>``:

- **cached** (ours): :func:`lare.generate.generate_answers`' loop - the prompt and ``<bot>`` prefilled once, each
  iteration one single-position forward with the attention row recorded over the image keys
  (:func:`latent_core.generate_with_latents` + :class:`lare.model.RefocusStep`), then ``<eot>`` and one ``generate``
  step;
- **naive**: the image features merged once, then at every iteration an eager forward of the language model over the
  whole ``[V, X_q, <bot>, z_1..z_{t-1}]`` with ``output_attentions`` and ``output_hidden_states`` (how one reads
  attention weights from transformers), the same window and extractor, and a full forward for the final logits.

Metrics (``--json``: the record as the last stdout line): ``speedup`` = naive / cached seconds (goal >= 3),
``max_latent_diff`` (goal <= 1e-5) and ``max_logit_diff``; the halting path's cost per iteration: ``step_s`` (an
iteration of the cached loop: (T=4 - T=1) / 3), ``halt_check_step_s`` (the same with a halting test that never
fires: the distance check alone) and ``halted_step_s`` (one sample halted after z_2: the masked path the rest of the
batch runs on).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lare.config import LareConfig
from lare.extractor import Extractor
from lare.model import LareModel
from lare.refocus import refocus
from latent_core.families import image_token_mask
from latent_core.latents import generate_with_latents

from latent_apps.bench.common import bench_device, fmt_ratio, ratio, report, timed, timed_pair

GOALS = {"speedup": 3.0, "max_latent_diff": 1e-5}
VOCAB = 1024
IMAGE, BOT, EOT, PAD = VOCAB - 1, VOCAB - 2, VOCAB - 3, 0


def _model(layers: int, hidden: int, heads: int, kv_heads: int, image_size: int, config: LareConfig, where):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    llava = LlavaConfig(
        text_config=dict(
            model_type="qwen2", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=2048, pad_token_id=PAD, eos_token_id=1, tie_word_embeddings=True,
        ),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, image_size=image_size, patch_size=14,
        ),
        image_token_index=IMAGE, vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=(image_size // 14) ** 2, tie_word_embeddings=True,
    )  # fmt: skip
    vlm = LlavaForConditionalGeneration(llava).to(where).eval()
    extractor = Extractor.for_model(vlm, config).to(where).eval()
    return LareModel(vlm, extractor, config, BOT, EOT)


def _inputs(batch: int, text: int, pad: int, n_image: int, image_size: int, where) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB - 3, (batch, text + n_image), generator=g)
    ids[:, 4 : 4 + n_image] = IMAGE  # a system turn's few tokens, the image, then the question
    mask = torch.ones_like(ids)
    if batch > 1 and pad:  # the last prompt is shorter: left padding
        ids[-1] = torch.cat([torch.full((pad,), PAD), ids[-1, :-pad]])
        mask[-1, :pad] = 0
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    return {"input_ids": ids.to(where), "attention_mask": mask.to(where), "pixel_values": pixels.to(where)}


def run(
    as_json: bool = False,
    layers: int = 8,
    hidden: int = 512,
    heads: int = 8,
    kv_heads: int = 2,
    image_size: int = 224,
    text_tokens: int = 32,
    batch: int = 2,
    pad: int = 12,
    extractor_hidden: int = 1536,
    extractor_heads: int = 12,
    num_latents: int = 4,
    repeats: int = 3,
    device: str = "auto",
) -> dict[str, Any]:
    """Run the benchmark, print the table (and with ``as_json`` the JSON record as the last line); return it.

    The keyword arguments shrink the configuration for tests; the defaults are the benchmark's."""
    where = bench_device(device)
    config = LareConfig(num_latents=num_latents, extractor_hidden=extractor_hidden, extractor_heads=extractor_heads)
    model = _model(layers, hidden, heads, kv_heads, image_size, config, where)
    n_image = (image_size // 14) ** 2
    pad = max(0, min(pad, text_tokens - 5))  # the padded prompt loses question tokens, never image tokens
    inputs = _inputs(batch, text_tokens, pad, n_image, image_size, where)
    vlm = model.vlm
    eager = copy.deepcopy(vlm)
    eager.set_attn_implementation("eager")
    window = config.window_for(model.grid())

    @torch.no_grad()
    def cached(k: int = num_latents, halt_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
        step = model.step()
        out = generate_with_latents(
            vlm, inputs, k, step_fn=step, halt_fn=halt_fn, max_new_tokens=1, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **step.loop_kwargs(inputs["input_ids"]),
        )  # fmt: skip
        return out.latents, out.generate_output.logits[0]

    @torch.no_grad()
    def naive() -> tuple[torch.Tensor, torch.Tensor]:
        lm, embed = eager.model.language_model, eager.get_input_embeddings()
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        features = eager.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        features = torch.stack(list(features)) if isinstance(features, list | tuple) else features
        image = image_token_mask(eager, ids)
        seq = embed(ids).clone()
        seq[image] = features.reshape(-1, features.shape[-1]).to(seq.dtype)
        seq = torch.cat([seq, embed(torch.full((batch, 1), BOT, device=where))], 1)
        seq_mask = torch.cat([mask, mask.new_ones((batch, 1))], 1)
        states, latents = [], []
        for _ in range(num_latents):
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            out = lm(
                inputs_embeds=seq, attention_mask=seq_mask, position_ids=positions, output_attentions=True,
                output_hidden_states=True,
            )  # fmt: skip
            row = torch.stack(out.attentions).mean((0, 2))[:, -1, : ids.shape[1]]  # [B, prompt]
            attention = row[image].reshape(batch, n_image)
            hidden_states = [h[:, -1] for h in out.hidden_states]
            states.append(model.extractor.query(hidden_states, out.last_hidden_state[:, -1]))
            v_local, _ = refocus(attention, features, window, config.stride)
            z = model.extractor(torch.stack(states, 1), v_local)
            latents.append(z)
            seq = torch.cat([seq, z[:, None]], 1)
            seq_mask = torch.cat([seq_mask, seq_mask.new_ones((batch, 1))], 1)
        seq = torch.cat([seq, embed(torch.full((batch, 1), EOT, device=where))], 1)
        seq_mask = torch.cat([seq_mask, seq_mask.new_ones((batch, 1))], 1)
        positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
        out = lm(inputs_embeds=seq, attention_mask=seq_mask, position_ids=positions)
        return torch.stack(latents, 1), eager.lm_head(out.last_hidden_state[:, -1])

    t_cached, t_naive, (lat_c, logit_c), (lat_n, logit_n) = timed_pair(cached, naive, repeats=repeats)
    never = lambda z, prev, t: torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)  # noqa: E731
    first_halts = lambda z, prev, t: torch.arange(z.shape[0], device=z.device) == 0  # noqa: E731
    t_one, _ = timed(lambda: cached(1), repeats=repeats)
    t_check, _ = timed(lambda: cached(halt_fn=never), repeats=repeats)
    t_halted, (lat_h, _) = timed(lambda: cached(halt_fn=first_halts), repeats=repeats)
    assert bool((lat_h[0, 2:] == 0).all()), "the halted sample kept running"
    steps = max(num_latents - 1, 1)
    record = {
        "bench": "lare-loop",
        "config": {
            "layers": layers,
            "hidden": hidden,
            "heads": heads,
            "kv_heads": kv_heads,
            "image_tokens": n_image,
            "text_tokens": text_tokens,
            "batch": batch,
            "pad": pad,
            "extractor_hidden": extractor_hidden,
            "extractor_heads": extractor_heads,
            "num_latents": num_latents,
            "window": window,
            "repeats": repeats,
        },  # fmt: skip
        "device": str(where),
        "cached_s": t_cached,
        "naive_s": t_naive,
        "speedup": ratio(t_naive, t_cached),
        "max_latent_diff": float((lat_c - lat_n).abs().max()),
        "max_logit_diff": float((logit_c - logit_n).abs().max()),
        "step_s": (t_cached - t_one) / steps,
        "halt_check_step_s": (t_check - t_one) / steps,
        "halted_step_s": (t_halted - t_one) / steps,
    }
    table = [
        ("speedup (naive / cached)", fmt_ratio(record["speedup"]), f">= {GOALS['speedup']}"),
        ("max_latent_diff", f"{record['max_latent_diff']:.1e}", f"<= {GOALS['max_latent_diff']:.0e}"),
        ("max_logit_diff", f"{record['max_logit_diff']:.1e}", "~0"),
        ("cached / naive seconds", f"{t_cached:.3f} / {t_naive:.3f}", ""),
        ("seconds per iteration: plain / halting check / one halted", (
            f"{record['step_s']:.4f} / {record['halt_check_step_s']:.4f} / {record['halted_step_s']:.4f}"), ""),
    ]  # fmt: skip
    title = (
        f"lare-loop: batch {batch} (padded) x ({n_image} image + {text_tokens} text tokens), T={num_latents}, "
        f"extractor {config.extractor_layers}x{extractor_hidden}, {layers} LLM layers"
    )
    report(title, table, record, as_json)
    return record
