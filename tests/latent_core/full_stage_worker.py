"""Worker of test_trainer.py's two-process DeepSpeed resume test (run with torchrun; not collected by pytest).

A full-weight stage (no adapter: the language model trains, its input embeddings stay frozen, plus an extra head)
under ZeRO-3 on CPU (gloo), three runs in one launch: 4 uninterrupted steps; the same run stopped after the step-2
checkpoint; that run resumed from DeepSpeed's engine checkpoint to step 4. Both finished runs save their stage,
and the resumed stage is loaded (load_stage) onto a base that ZeRO-3 partitioned at load.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from latent_core.collate import SupervisedCollator
from latent_core.hub import load_model, load_processor
from latent_core.trainer import LatentModel, LatentTrainer, LatentTrainingArguments
from torch import nn
from transformers import TrainerCallback

ROWS = [
    {"id": "a", "prompt": "How many red circles are there?", "answer": "two"},
    {"id": "b", "prompt": "Is there a blue square?", "answer": "yes"},
    {"id": "c", "prompt": "What colour is the star?", "answer": "yellow"},
    {"id": "d", "prompt": "Count the shapes.", "answer": "five"},
]


class WithHead(LatentModel):
    def __init__(self, backbone: nn.Module, hidden: int) -> None:
        super().__init__(backbone)
        self.head = nn.Linear(hidden, 8)

    def forward(self, **inputs):
        out = self.backbone(**inputs, output_hidden_states=True)
        aux = self.head(out.hidden_states[-1]).pow(2).mean()
        return {"loss": out.loss, "logits": out.logits, "aux_losses": {"head": aux}}


class StopAfter(TrainerCallback):
    """Stands in for kill -9 right after a checkpoint: training ends there, nothing else is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def run(base: str, out: Path, stop_after: int | None = None, resume: str | None = None) -> None:
    args = LatentTrainingArguments(
        output_dir=str(out),
        deepspeed="zero3",
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        remove_unused_columns=False,
        loss_weights={"head": 0.1},
        seed=0,
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
    )
    model = load_model(base)
    model.get_input_embeddings().requires_grad_(False)
    torch.manual_seed(1)
    wrapped = WithHead(model, model.config.hidden_size)
    processor = load_processor(base)
    trainer = LatentTrainer(
        model=wrapped,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        data_collator=SupervisedCollator(processor),
        processing_class=processor,
        stage_info={"stage": "full"},
    )
    if stop_after is not None:
        trainer.add_callback(StopAfter(stop_after))
        trainer.train()
        return
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "stage"))


def load_partitioned(base: str, stage: Path, out: Path) -> None:
    """load_stage onto a base partitioned by ZeRO-3 at load: every trained weight, gathered back, equals the file."""
    from latent_core.trainer import STAGE_WEIGHTS_NAME, load_stage
    from latent_core.zero3 import gathered, zero3_enabled
    from safetensors.torch import load_file

    args = LatentTrainingArguments(output_dir=str(out / "load"), deepspeed="zero3", use_cpu=True, ddp_backend="gloo")
    model = load_model(base)
    assert zero3_enabled() and args.deepspeed, "the base was not loaded under ZeRO-3"
    params = dict(model.named_parameters())
    assert all(p.numel() == 0 for p in params.values()), "the base is not partitioned"
    load_stage(model, stage)
    saved = load_file(str(stage / STAGE_WEIGHTS_NAME))
    with gathered([params[k] for k in saved], modifier_rank=None):
        diff = max(float((params[k].detach() - v).abs().max()) for k, v in saved.items())
    if torch.distributed.get_rank() == 0:
        (out / "partitioned_load_diff.txt").write_text(str(diff))


def main(base: str, out: str) -> None:
    root = Path(out)
    run(base, root / "uninterrupted")
    run(base, root / "killed", stop_after=2)
    run(base, root / "killed", resume=str(root / "killed" / "checkpoint-2"))
    load_partitioned(base, root / "killed" / "stage", root)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from latent_core.testing import exit_distributed

    exit_distributed()
