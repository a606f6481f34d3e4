"""The latent-core training pattern on a tiny model: new tokens, LoRA, LatentTrainer, one saved stage.

    uv run examples/train_lora.py --out runs/example                      # one process (CPU or GPU)
    uv run torchrun --nproc_per_node 2 examples/train_lora.py --deepspeed zero3 --cpu   # ZeRO-3, 2 CPU processes

Swap `tiny_model(...)` for `load_model(...)` / `load_processor(...)` to train a real checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from latent_core import (
    LatentTrainer,
    LatentTrainingArguments,
    SupervisedCollator,
    add_special_tokens,
    prepare_lora_model,
)
from latent_core.testing import tiny_model

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--deepspeed", default=None, help="zero2 | zero3 | zero3_offload | path to a JSON config")
    parser.add_argument("--cpu", action="store_true", help="train on CPU (with DeepSpeed: gloo)")
    args = parser.parse_args(argv)

    model, processor = tiny_model("qwen2_5_vl")
    new_ids = add_special_tokens(model, processor, ["<think>"])
    model = prepare_lora_model(model, new_token_ids=new_ids, r=16, alpha=32)
    rows = Dataset.from_list(
        [
            {"id": "0", "prompt": "Is there a red circle?", "answer": "<think> yes", "image": "shapes.png"},
            {"id": "1", "prompt": "How many red circles are there?", "answer": "<think> two", "image": "shapes.png"},
        ]
    )
    training_args = LatentTrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        deepspeed=args.deepspeed,
        use_cpu=args.cpu,
        ddp_backend="gloo" if args.cpu and args.deepspeed else None,
    )
    trainer = LatentTrainer(
        model=model,
        args=training_args,
        train_dataset=rows,
        processing_class=processor,
        data_collator=SupervisedCollator(processor, image_root=DEMO),
    )
    trainer.train()
    trainer.save_model(args.out)
    return Path(args.out)


if __name__ == "__main__":
    main()
