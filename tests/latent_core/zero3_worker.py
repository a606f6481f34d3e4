"""Worker of test_trainer.py's two-process ZeRO-3 test (run with torchrun; not collected by pytest).

Trains LoRA + two new tokens (their rows) + one extra head for a few steps under DeepSpeed ZeRO-3 on CPU (gloo),
saves the stage, then runs the ZeRO-3 model (parameters gathered by DeepSpeed's hooks) on a fixed batch and writes
its logits for the single-process comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from latent_core.collate import SupervisedCollator
from latent_core.lora import prepare_lora_model
from latent_core.testing import tiny_model
from latent_core.tokens import add_special_tokens
from latent_core.trainer import LatentModel, LatentTrainer, LatentTrainingArguments
from safetensors.torch import save_file
from torch import nn

TOKENS = ["<think_a>", "<think_b>"]
ROWS = [
    {"id": "a", "prompt": "How many red circles are there?", "answer": "<think_a> two"},
    {"id": "b", "prompt": "Is there a blue square?", "answer": "<think_b> yes"},
    {"id": "c", "prompt": "What colour is the star?", "answer": "<think_a> yellow"},
    {"id": "d", "prompt": "Count the shapes.", "answer": "<think_b> five"},
]


class WithHead(LatentModel):
    """The trainer's model: a PEFT model plus an extra head with an auxiliary loss."""

    def __init__(self, backbone: nn.Module, hidden: int) -> None:
        super().__init__(backbone)
        self.head = nn.Linear(hidden, 8)

    def forward(self, **inputs):
        out = self.backbone(**inputs, output_hidden_states=True)
        aux = self.head(out.hidden_states[-1]).pow(2).mean()
        return {"loss": out.loss, "logits": out.logits, "aux_losses": {"head": aux}}


def build(seed: int = 0):
    model, tokenizer = tiny_model("causal_lm", seed=seed)
    ids = add_special_tokens(model, tokenizer, TOKENS)
    return model, tokenizer, ids


def main(out: str) -> None:
    args = LatentTrainingArguments(
        output_dir=out,
        deepspeed="zero3",
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        loss_weights={"head": 0.1},
        seed=0,
        use_cpu=True,
        ddp_backend="gloo",
    )
    model, tokenizer, ids = build()
    peft_model = prepare_lora_model(model, new_token_ids=ids, r=8, alpha=16)
    torch.manual_seed(1)
    wrapped = WithHead(peft_model, model.config.hidden_size)
    collator = SupervisedCollator(tokenizer)
    trainer = LatentTrainer(
        model=wrapped,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        data_collator=collator,
        processing_class=tokenizer,
        stage_info={"tokens": TOKENS},
    )
    trainer.train()
    trainer.save_model(out)
    batch = collator(ROWS)
    trainer.model_wrapped.eval()
    with torch.no_grad():
        logits = trainer.model_wrapped(**batch)["logits"]
    if trainer.args.process_index == 0:
        save_file({"logits": logits.contiguous()}, str(Path(out) / "zero3_logits.safetensors"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        (Path(out) / "losses.txt").write_text(" ".join(map(str, losses)))


if __name__ == "__main__":
    main(sys.argv[1])
    from latent_core.testing import exit_distributed

    exit_distributed()
