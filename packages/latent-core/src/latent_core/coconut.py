"""Coconut: continuous thoughts replacing chain-of-thought steps by a curriculum (Hao et al. 2024, "Training Large
Language Models to Reason in a Continuous Latent Space", arXiv:2412.06769), on latent-core's KV-cached loop.

The field's reference for "latent steps help", and the control that tells whether a method's own losses (Heima's
distillation, LaViT's alignment, LaRe's refocusing) add anything over plain continuous thoughts.

- **Continuous thought** (Section 3, Figure 1): the last hidden state (final-norm output) of the previous position is
  fed back as the next input embedding: the identity step of :func:`latent_core.forward_with_latents` /
  :func:`latent_core.generate_with_latents`. One sequence is
  ``[prompt, <|start-latent|>, h_1 .. h_n, <|end-latent|>, remaining steps, answer]``.
- **Curriculum** (Section 3, "Training Procedure"; Figure 2): stage k (1..M, M = ``max_latent_stage``) replaces the
  first k reasoning steps by ``k * c`` thoughts (c = ``c_thought``); the last stage M replaces *every* step by
  ``M * c`` thoughts (the reference code's stages past ``max_latent_stage`` with ``pad_latent_to_max``: one
  rectangular batch whatever a sample's number of steps). The loss is the next-token loss of the remaining steps
  and the answer only (prompt, delimiters and thoughts are not supervised); the optimizer is reset at every stage
  (``reset_optimizer``). Stage 0 (the CoT model) is the base: the paper starts from a CoT-finetuned model, which the
  shipped shapes bases are.
- **Steps** of a LLaVA-CoT answer (:func:`cot_steps`): with ``unit="stage"`` the SUMMARY, CAPTION and REASONING
  blocks (M = 3 replaces all three, as Heima's thinking tokens do, but continuous); with ``unit="sentence"`` the
  SUMMARY and the CAPTION blocks, then each sentence of the REASONING (the shapes task writes one per hop). The
  ``<CONCLUSION>`` block is the answer and always stays in text.
- **Inference** (Section 4.1): ``M * c`` thoughts, ``<|end-latent|>``, then greedy decoding on the same cache
  (:func:`generate_coconut`); ``latents="zero" | "shuffle"`` are the latent diagnostics' controls
  (:mod:`latent_core.diagnostics`).

Paper settings (Appendix C): GSM8k c = 2, M = 3, 3 epochs per stage; ProsQA / ProntoQA c = 1, M = 6, 5 epochs per
stage; lr 1e-4, AdamW, weight decay 0.01, batch 128, every weight trained (GPT-2). This implementation trains every
weight too (the checkpoint of each stage is a standard ``save_pretrained`` one) and counts steps per stage, not epochs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from latent_core.trainer import LatentTrainer

__all__ = [
    "COCONUT_NAME",
    "STEP_UNITS",
    "CoconutAnswers",
    "CoconutCollator",
    "CoconutConfig",
    "CoconutTrainer",
    "cot_steps",
    "generate_coconut",
    "load_coconut",
    "read_coconut_rows",
    "remaining_answer",
    "train_coconut",
]

COCONUT_NAME = "coconut.json"
"""What a trained Coconut stage writes next to its checkpoint: the config, the stage and the delimiter ids."""

STEP_UNITS = ("stage", "sentence")

_BLOCK = re.compile(r"<(SUMMARY|CAPTION|REASONING|CONCLUSION)>(.*?)</\1>", flags=re.DOTALL)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class CoconutConfig:
    """The curriculum (see the module docstring).

    Attributes:
        c_thought: continuous thoughts per replaced step (c).
        max_latent_stage: the last curriculum stage M: it replaces every step by ``M * c`` thoughts.
        unit: what one step is (:data:`STEP_UNITS`).
        bot_token, eot_token: the delimiters (the reference code's names).
    """

    c_thought: int = 1
    max_latent_stage: int = 3
    unit: str = "stage"
    bot_token: str = "<|start-latent|>"
    eot_token: str = "<|end-latent|>"

    def __post_init__(self) -> None:
        if self.c_thought < 1 or self.max_latent_stage < 1:
            raise ValueError(f"c_thought and max_latent_stage must be >= 1, got {self.c_thought}, "
                             f"{self.max_latent_stage}")  # fmt: skip
        if self.unit not in STEP_UNITS:
            raise ValueError(f"unknown step unit {self.unit!r}; choose one of {', '.join(STEP_UNITS)}")

    def num_latents(self, stage: int) -> int:
        """Thoughts at curriculum ``stage`` (0 for the CoT base): ``c * min(stage, M)``."""
        return self.c_thought * min(max(stage, 0), self.max_latent_stage)


def cot_steps(answer: str, unit: str = "stage") -> tuple[list[tuple[str, str]], str]:
    """The reasoning steps of a staged answer and its answer block: ``([(stage, text), ...], "<CONCLUSION>..")``.

    ``unit="stage"``: one step per SUMMARY / CAPTION / REASONING block (text stripped); ``"sentence"``: the SUMMARY
    and CAPTION blocks, then each sentence of the REASONING block. Stage tags are not part of a step's text.

    Raises:
        ValueError: the answer has no closed ``<CONCLUSION>`` block or no step before it.
    """
    if unit not in STEP_UNITS:
        raise ValueError(f"unknown step unit {unit!r}; choose one of {', '.join(STEP_UNITS)}")
    steps: list[tuple[str, str]] = []
    conclusion = None
    for match in _BLOCK.finditer(answer):
        name, text = match.group(1), match.group(2).strip()
        if name == "CONCLUSION":
            conclusion = match.group(0)
            break
        if unit == "sentence" and name == "REASONING":
            steps += [(name, s) for s in _SENTENCE.split(text) if s]
        else:
            steps.append((name, text))
    if conclusion is None:
        raise ValueError("the answer has no closed <CONCLUSION> block")
    if not steps:
        raise ValueError("the answer has no reasoning step before its <CONCLUSION>")
    return steps, conclusion


def remaining_answer(answer: str, stage: int, config: CoconutConfig) -> str:
    """The text target of ``answer`` at curriculum ``stage``: the steps left after the first ``stage`` (all of them
    at stage M and beyond), each stage's remaining text in its tags, blocks separated by a blank line, then the
    ``<CONCLUSION>`` block. Stage 0 gives the staged answer back (blocks rejoined the way LLaVA-CoT writes them)."""
    steps, conclusion = cot_steps(answer, config.unit)
    skip = len(steps) if stage >= config.max_latent_stage else max(stage, 0)
    blocks: list[tuple[str, list[str]]] = []
    for name, text in steps[skip:]:
        if blocks and blocks[-1][0] == name:
            blocks[-1][1].append(text)
        else:
            blocks.append((name, [text]))
    return "\n\n".join([*(f"<{name}>{' '.join(texts)}</{name}>" for name, texts in blocks), conclusion])


def read_coconut_rows(
    path: str | Path, image_root: str | Path, config: CoconutConfig, report: Any = None
) -> list[dict[str, Any]]:
    """Training rows ``{id, image, question, answer}`` of a LLaVA-CoT file (:func:`latent_core.read_llava_cot`; one
    per human / gpt turn, the ``<image>`` marker removed from the question). Records the reader skips are counted in
    ``report`` by its reasons (its ``kept`` counts records); a turn whose answer has no reasoning step or no closed
    ``<CONCLUSION>`` (:func:`cot_steps`) is skipped and counted as ``no_cot_steps``."""
    from latent_core.readers import read_llava_cot

    rows = []
    for record in read_llava_cot(path, image_root, report):
        turns = record["conversations"]
        for i in range(0, len(turns) - 1, 2):
            answer = turns[i + 1]["value"]
            row_id = record["id"] if i == 0 else f"{record['id']}#{i // 2}"
            try:
                cot_steps(answer, config.unit)
            except ValueError:
                if report is not None:
                    report.skip("no_cot_steps", row_id)
                continue
            question = turns[i]["value"].replace("<image>", "").strip()
            rows.append({"id": row_id, "image": str(record["image"]), "question": question, "answer": answer})
    return rows


class CoconutCollator:
    """Rows ``{id, image, question, answer}`` (``answer`` a staged answer) -> a batch for :class:`CoconutTrainer` at
    curriculum ``stage``: the prompt LEFT padded, ``answer_ids`` / ``labels`` the remaining steps and the answer
    (:func:`remaining_answer`) as the chat template writes the assistant turn
    (:func:`latent_core.collate.answer_batch`)."""

    def __init__(self, processor: Any, config: CoconutConfig, stage: int) -> None:
        self.processor, self.config, self.stage = processor, config, stage

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        from latent_core.collate import answer_batch

        staged = [{**row, "answer": remaining_answer(row["answer"], self.stage, self.config)} for row in rows]
        return answer_batch(self.processor, staged)


class CoconutTrainer(LatentTrainer):
    """:class:`latent_core.LatentTrainer` whose loss is Coconut's: ``num_latents`` continuous thoughts between
    ``bot_id`` and ``eot_id`` (:func:`latent_core.forward_with_latents`, identity step), then the teacher-forced
    remaining steps and answer. The model is the transformers model itself, every weight trained, so each stage and
    checkpoint is a standard ``save_pretrained`` one."""

    def __init__(self, *args: Any, num_latents: int, bot_id: int, eot_id: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_latents, self.bot_id, self.eot_id = num_latents, bot_id, eot_id

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from latent_core.latents import forward_with_latents

        batch = dict(inputs)
        answer_ids, labels = batch.pop("answer_ids"), batch.pop("labels")
        out = forward_with_latents(
            self.accelerator.unwrap_model(model), batch, self.num_latents, labels=labels,
            start_ids=[self.bot_id], end_ids=[self.eot_id], answer_ids=answer_ids,
        )  # fmt: skip
        if model.training:
            self._loss_terms["ntp"].append(float(out.loss.detach()))
        return (out.loss, {"loss": out.loss, "logits": out.logits}) if return_outputs else out.loss


def _stage_dir(out: Path, stage: int) -> Path:
    return out / f"stage_{stage}"


def train_coconut(
    base: str | Path,
    rows: Sequence[dict[str, Any]],
    out: str | Path,
    config: CoconutConfig,
    steps_per_stage: int,
    *,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.01,
    seed: int = 0,
    bf16: bool | None = None,
    save_steps: int = 100,
    show_progress: bool = True,
    **training_args: Any,
) -> dict[str, Any]:
    """Train Coconut's curriculum stages 1..M from the CoT model ``base`` on ``rows`` (``{id, image, question,
    answer}``, staged answers), each stage ``steps_per_stage`` optimizer steps from the previous stage's weights
    with a fresh optimizer, saved to ``out/stage_k`` (checkpoint, processor, :data:`COCONUT_NAME`,
    ``coconut_stage.json``). A finished stage is skipped on a re-run; a killed stage resumes from its last
    checkpoint (``out/stage_k/checkpoints``). Extra keyword arguments go to
    :class:`latent_core.LatentTrainingArguments` (``deepspeed``, ``gradient_accumulation_steps``, ...).

    Returns:
        ``{"stages": [each stage's summary], "final": out/stage_M}``.
    """
    from datasets import Dataset

    from latent_core.hub import load_model, load_processor
    from latent_core.tokens import add_special_tokens
    from latent_core.trainer import LatentTrainingArguments

    out = Path(out)
    if steps_per_stage < 1:
        raise ValueError("steps_per_stage must be >= 1")
    rows = [{"id": r["id"], "image": None if r.get("image") is None else str(r["image"]), "question": r["question"],
             "answer": r["answer"]} for r in rows]  # fmt: skip
    for row in rows:  # every row must have its steps: fail before training, naming the row
        try:
            cot_steps(row["answer"], config.unit)
        except ValueError as err:
            raise ValueError(f"row {row['id']!r}: {err}") from None
    summaries = []
    for stage in range(1, config.max_latent_stage + 1):
        directory = _stage_dir(out, stage)
        if (directory / COCONUT_NAME).is_file():
            summaries.append(json.loads((directory / "coconut_stage.json").read_text(encoding="utf-8")))
            continue
        start = str(base) if stage == 1 else str(_stage_dir(out, stage - 1))
        model, processor = load_model(start), load_processor(start)
        model.requires_grad_(True)
        bot_id, eot_id = add_special_tokens(model, processor, [config.bot_token, config.eot_token])
        args = LatentTrainingArguments(
            output_dir=str(directory / "checkpoints"),
            max_steps=steps_per_stage,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            lr_scheduler_type="constant",  # the reference code: AdamW at a constant rate, reset every stage
            logging_steps=max(1, min(25, steps_per_stage // 10)),
            save_strategy="steps",
            save_steps=save_steps,
            save_total_limit=1,
            seed=seed + stage,
            data_seed=seed + stage,
            bf16=bf16,
            report_to="none",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=not show_progress,
            use_cpu=not torch.cuda.is_available(),
            **training_args,
        )
        info = {"method": "coconut", "stage": stage, "base": str(base), "coconut": asdict(config)}
        trainer = CoconutTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows),
            data_collator=CoconutCollator(processor, config, stage), processing_class=processor, stage_info=info,
            num_latents=config.num_latents(stage), bot_id=bot_id, eot_id=eot_id,
        )  # fmt: skip
        summary = trainer.train_and_save(directory, "coconut_stage.json", num_latents=config.num_latents(stage))
        summaries.append(summary)
        if args.should_save:
            record = {**info, "num_latents": config.num_latents(stage), "bot_id": bot_id, "eot_id": eot_id}
            (directory / "training_args.bin").unlink(missing_ok=True)  # a pickle; the stage files record it
            (directory / COCONUT_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return {"stages": summaries, "final": str(_stage_dir(out, config.max_latent_stage))}


def load_coconut(path: str | Path, **load_kwargs: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, processor, record)`` of a trained Coconut stage (a directory :func:`train_coconut` wrote, or a run
    directory: its last stage); ``record`` is its :data:`COCONUT_NAME` (config, stage, ``num_latents``, ids).

    Raises:
        FileNotFoundError: no Coconut stage there (one line naming the command that writes one).
    """
    from latent_core.hub import load_model, load_processor

    path = Path(path)
    if not (path / COCONUT_NAME).is_file():
        stages = sorted(path.glob("stage_*/" + COCONUT_NAME), key=lambda p: int(p.parent.name.split("_")[1]))
        if not stages:
            raise FileNotFoundError(
                f"{path} is not a Coconut stage (no {COCONUT_NAME}): train one with `latent coconut train`"
            )
        path = stages[-1].parent
    record = json.loads((path / COCONUT_NAME).read_text(encoding="utf-8"))
    return load_model(str(path), **load_kwargs).eval(), load_processor(str(path)), record


@dataclass
class CoconutAnswers:
    """Decoded answers: ``texts``, ``token_counts`` (end of turn excluded), ``sequences`` (each answer's token ids,
    end of turn excluded), ``latent_steps`` (thoughts per sample), ``latents`` ``[B, n, d]`` and ``latent_similarity``
    (each sample's mean cosine to the other samples' thoughts; ``nan`` for a batch of one or without thoughts)."""

    texts: list[str]
    token_counts: list[int]
    sequences: list[list[int]]
    latent_steps: list[int]
    latents: torch.Tensor
    latent_similarity: list[float]


@torch.no_grad()
def generate_coconut(
    model: Any,
    processor: Any,
    inputs: dict[str, Any],
    record: dict[str, Any],
    max_new_tokens: int = 64,
    *,
    num_latents: int | None = None,
    latents: str = "real",
) -> CoconutAnswers:
    """Greedy answers after the continuous thoughts: ``inputs`` a LEFT-padded prompt batch (the training form),
    ``record`` the stage's :data:`COCONUT_NAME`, ``num_latents`` its ``num_latents`` by default, ``latents`` a
    control of :mod:`latent_core.diagnostics` (``real``, ``zero``, ``shuffle``)."""
    from latent_core.diagnostics import control_step, pairwise_cosine
    from latent_core.latents import generate_with_latents
    from latent_core.prompts import decode_answers

    n = record["num_latents"] if num_latents is None else num_latents
    batch = inputs["input_ids"].shape[0]
    out = generate_with_latents(
        model, inputs, n, step_fn=control_step(None, latents, batch), start_ids=[record["bot_id"]],
        end_ids=[record["eot_id"]], max_new_tokens=max_new_tokens, do_sample=False,
    )  # fmt: skip
    texts, counts, rows = decode_answers(processor, model, out.sequences)
    similarity = pairwise_cosine(out.latents.float().mean(1)).tolist() if n else [float("nan")] * batch
    return CoconutAnswers(texts, counts, rows, [int(s) for s in out.num_steps], out.latents, similarity)
