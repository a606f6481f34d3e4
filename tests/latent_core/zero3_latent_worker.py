"""Worker of test_zero3_latents.py (run with torchrun; not collected by pytest).

One differentiable latent forward under DeepSpeed ZeRO-3 on CPU (gloo, 2 processes, every parameter partitioned):
``forward_with_latents`` with a latent step function, inside ``attention_bias`` (a gate on prompt keys for every
latent and answer query) and ``record_attention`` (those rows, with gradients), then a backward. Every rank runs the
same batch, so the averaged gradients equal those of the same forward in one process; rank 0 writes the loss and the
full gradient of every parameter (``deepspeed.utils.safe_get_full_grad``) for the single-process comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from latent_core.attention import attention_bias, record_attention
from latent_core.latents import forward_with_latents
from latent_core.testing import tiny_model
from latent_core.trainer import LatentModel
from safetensors.torch import save_file
from torch import nn

QUESTIONS = ["How many red circles are there?", "Is there a blue square?"]
ANSWER = [[11, 12, 13, 14], [21, 22, 23, 24]]
NUM_LATENTS = 2
GATE = -1.5  # ln(gamma) of a partly closed gate
ATTENTION_WEIGHT = 0.5


class LatentLoop(LatentModel):
    """The trained model: a backbone plus the latent step function (a Linear), the loss = NTP + attention term."""

    def __init__(self, backbone: nn.Module, hidden: int) -> None:
        super().__init__(backbone)
        self.step = nn.Linear(hidden, hidden)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(1)
            self.step.weight.copy_(torch.eye(hidden) + 0.05 * torch.randn(hidden, hidden, generator=generator))
            self.step.bias.zero_()

    def forward(self, input_ids, attention_mask, answer_ids, key_mask):
        none = torch.zeros_like(key_mask)  # no prompt query is gated or recorded: only what comes after it
        with (
            attention_bias(self.backbone, none, key_mask, GATE, extend_queries=True),
            record_attention(self.backbone, none, key_mask, extend_queries=True) as recorder,
        ):
            out = forward_with_latents(
                self.backbone,
                {"input_ids": input_ids, "attention_mask": attention_mask},
                NUM_LATENTS,
                labels=answer_ids,
                step_fn=lambda hidden, state: self.step(hidden),
                answer_ids=answer_ids,
            )
        mass = torch.stack([w.sum(-1).mean() for w in recorder.weights])  # attention mass on the gated keys
        return {"loss": out.loss + ATTENTION_WEIGHT * mass.mean(), "ntp": out.loss, "mass": mass.mean()}


def build():
    model, tokenizer = tiny_model("causal_lm", seed=0)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", add_special_tokens=False, padding=True)
    key_mask = enc["attention_mask"].bool().clone()
    key_mask[:, -4:] = False  # gate the question, not the last (generation-prompt) tokens
    batch = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "answer_ids": torch.tensor(ANSWER),
        "key_mask": key_mask,
    }
    return LatentLoop(model, model.config.hidden_size), batch


def main(out: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model, batch = build()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    partitioned = [name for name, p in engine.module.named_parameters() if p.numel() == 0]
    # The model's forward called as a function, not through the engine's module call: nothing has gathered the
    # parameters the loop reads first (the embedding), as at generate time or in a method's own training step.
    outputs = engine.module.forward(**batch)
    engine.backward(outputs["loss"])
    grads = {}
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param)
        if grad is not None:
            grads[name] = grad.detach().float().clone()
    if torch.distributed.get_rank() == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file(grads, str(Path(out) / "grads.safetensors"))
        values = {k: float(outputs[k]) for k in ("loss", "ntp", "mass")}
        (Path(out) / "result.txt").write_text(f"{values['loss']} {values['ntp']} {values['mass']} {len(partitioned)}\n")


if __name__ == "__main__":
    main(sys.argv[1])
    from latent_core.testing import exit_distributed

    exit_distributed()
