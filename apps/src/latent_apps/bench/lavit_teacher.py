"""`bench lavit-teacher`: our fused teacher pass vs the LaViT authors' extraction pipeline, rebuilt faithfully.

A random Qwen2.5-VL (language model: 8 layers, hidden 256, 8 query heads sharing 2 KV heads; vision: 2 layers)
with a realistic image-token count: 896 x 896 images give 1024 merged image tokens (32 x 32; the paper's max_pixels
allow 1280), a batch of 4 questions, 24 answer tokens each (no end-of-sequence token, so every answer has the same
length). Both compute A_traj's scores S_j (Eq. 2: mean over layers, heads and the answer tokens of the attention
to each image token) and V_sem:

- **authors**: per sample (batch 1, as their scripts), ``generate`` the answer; a second forward over the prompt
  for the visual features; a third, teacher-forced forward with eager attention and ``output_attentions=True`` (every
  layer's full L x L maps) over prompt + answer;
- **ours** (:func:`lavit.teacher.teacher_pass`): one batched, left-padded greedy pass on the KV cache with the
  answer rows recorded while decoding and V_sem read at prefill.

Metrics: ``throughput_ratio`` = our samples/s over theirs (goal >= 2), ``peak_mem_ratio`` = our peak bytes over
theirs (goal <= 0.5), ``max_abs_diff`` between the two S_j (goal <= 1e-5) and ``vsem_max_diff``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from latent_apps.bench.common import bench_device, fmt_ratio, peak_memory, ratio, report, timed_pair

GOALS = {"throughput_ratio": 2.0, "peak_mem_ratio": 0.5, "max_abs_diff": 1e-5}
QUESTIONS = [
    "How many red circles are there?",
    "Is there a small yellow star in the top left corner of the picture?",
    "What colour is the shape at row 3, column 2?",
    "Which is larger, the square or the triangle?",
]


def _teacher(layers: int, hidden: int, heads: int, kv_heads: int, image_px: int):
    """A random Qwen2.5-VL of the real class and its processor, allowing images up to ``image_px`` square."""
    from latent_core.testing import tiny_model
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    small, tiny_processor = tiny_model("qwen2_5_vl")
    config = copy.deepcopy(small.config)
    text = config.text_config
    head_dim = hidden // heads
    text.hidden_size, text.num_hidden_layers = hidden, layers
    text.layer_types = ["full_attention"] * layers
    text.num_attention_heads, text.num_key_value_heads = heads, kv_heads
    text.intermediate_size, text.max_position_embeddings = hidden * 3, 4096
    third = head_dim // 2 // 3
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [head_dim // 2 - 2 * third, third, third]}
    config.vision_config.out_hidden_size = hidden
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # every answer runs to max_new_tokens: equal work for both
    pixels = dict(min_pixels=28 * 28, max_pixels=image_px * image_px)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels),
        video_processor=tiny_processor.video_processor,
        tokenizer=tiny_processor.tokenizer,
        chat_template=tiny_processor.chat_template,
    )
    return model, processor


def _authors(model, eager, processor, images, questions, new_tokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The released pipeline's three passes per sample (batch 1): generate; features; eager attention maps."""
    from latent_core.families import image_token_mask
    from latent_core.prompts import encode_chats, render_prompts

    out = []
    for image, question in zip(images, questions, strict=True):
        inputs = dict(encode_chats(processor, render_prompts(processor, [question], [1]), [[image]]))
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            prompt_len = inputs["input_ids"].shape[1]
            image_pos = image_token_mask(model, inputs["input_ids"])[0]
            v_sem = model.model(**inputs).last_hidden_state[0, image_pos]  # pass 2: features
            fed = generated[:, : prompt_len + new_tokens - 1]  # the answer tokens that were fed (the last one never)
            forced = {**inputs, "input_ids": fed, "attention_mask": torch.ones_like(fed)}
            types = inputs["mm_token_type_ids"]
            forced["mm_token_type_ids"] = torch.cat([types, types.new_zeros((1, fed.shape[1] - prompt_len))], 1)
            attentions = eager(**forced, output_attentions=True).attentions  # pass 3: every L x L map
            rows = torch.stack([a[0, :, prompt_len:] for a in attentions])  # [layers, heads, answer, S]
            keys = torch.nn.functional.pad(image_pos, (0, rows.shape[-1] - prompt_len))
            out.append((rows[..., keys].mean((0, 1, 2)), v_sem))
    return out


def run(
    as_json: bool = False,
    batch: int = 4,
    image_px: int = 896,
    new_tokens: int = 24,
    layers: int = 8,
    hidden: int = 256,
    heads: int = 8,
    kv_heads: int = 2,
    repeats: int = 2,
    device: str = "auto",
) -> dict[str, Any]:
    """Run the benchmark, print the table (and with ``as_json`` the JSON record as the last line); return it.
    The keyword arguments shrink the configuration for tests; the defaults are the benchmark's."""
    from lavit.teacher import TeacherOptions, teacher_pass
    from PIL import Image

    where = bench_device(device)
    model, processor = _teacher(layers, hidden, heads, kv_heads, image_px)
    model.to(where)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (image_px, image_px, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(batch)
    ]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    options = TeacherOptions(max_new_tokens=new_tokens)

    def ours():
        return teacher_pass(model, processor, images, questions, options)

    def authors():
        return _authors(model, eager, processor, images, questions, new_tokens)

    t_ours, t_authors, got, want = timed_pair(ours, authors, repeats=repeats)
    mem_ours, _ = peak_memory(ours, where)
    mem_authors, _ = peak_memory(authors, where)
    diff = max(float((g.scores - w[0].cpu()).abs().max()) for g, w in zip(got, want, strict=True))
    vsem_diff = max(float((g.v_sem - w[1].cpu()).abs().max()) for g, w in zip(got, want, strict=True))
    record = {
        "bench": "lavit-teacher",
        "config": {
            "batch": batch,
            "image_px": image_px,
            "image_tokens": int(got[0].scores.numel()),
            "new_tokens": new_tokens,
            "layers": layers,
            "hidden": hidden,
            "heads": heads,
            "kv_heads": kv_heads,
            "repeats": repeats,
        },  # fmt: skip
        "device": str(where),
        "ours_s": t_ours,
        "authors_s": t_authors,
        "ours_samples_per_s": batch / t_ours,
        "authors_samples_per_s": batch / t_authors,
        "throughput_ratio": ratio(t_authors, t_ours),
        "ours_peak_bytes": mem_ours,
        "authors_peak_bytes": mem_authors,
        "peak_mem_ratio": ratio(mem_ours, mem_authors),
        "max_abs_diff": diff,
        "vsem_max_diff": vsem_diff,
    }
    table = [
        ("throughput_ratio (ours / authors' 3 passes)", fmt_ratio(record["throughput_ratio"]),
         f">= {GOALS['throughput_ratio']}"),
        ("peak_mem_ratio", fmt_ratio(record["peak_mem_ratio"]), f"<= {GOALS['peak_mem_ratio']}"),
        ("max_abs_diff of S_j", f"{diff:.1e}", f"<= {GOALS['max_abs_diff']:.0e}"),
        ("max diff of V_sem", f"{vsem_diff:.1e}", ""),
        ("ours / authors samples per s", f"{batch / t_ours:.2f} / {batch / t_authors:.2f}", ""),
        ("ours / authors peak MiB", f"{mem_ours / 2**20:.1f} / {mem_authors / 2**20:.1f}", ""),
    ]  # fmt: skip
    title = (
        f"lavit-teacher: {batch} samples, {record['config']['image_tokens']} image tokens, {new_tokens} answer tokens, "
        f"{layers} layers"
    )
    report(title, table, record, as_json)
    return record
