"""Worker of test_build.py's two-process build (run with torchrun; not collected by pytest): the tiny Qwen2.5-VL
as teacher on every rank, each building its share of the batches, rank 0 merging."""

from __future__ import annotations

import sys

import torch
from latent_core.testing import tiny_model
from lavit.build import BuildConfig, build
from lavit.teacher import TeacherOptions


def main(data: str, images: str, out: str) -> None:
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    model, processor = tiny_model("qwen2_5_vl")
    config = BuildConfig(
        data=data, images=images, out=out, teacher="tiny", options=TeacherOptions(max_new_tokens=4),
        batch_size=3, keep_rejected=True, overlays=0,
    )  # fmt: skip
    build(config, model.eval(), processor)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
