"""Heima inference: load a trained stage, generate greedily, capture thinking-token hidden states, export.

METHODS.md section 1, "Inference": greedy decoding (the authors sampled at T=0.6, which makes accuracy and token
counts irreproducible); per sample the generated token count, the reasoning-token count (tokens before
``<CONCLUSION>``), the answer and the latency; for the interpreters, the hidden state of every generated thinking
token, recorded *while generating* with the KV cache on (only those rows are kept, nothing is re-run).

Which hidden state is a choice (paper 000 section 3.3 vs. the authors' code): ``position="predictor"`` (default,
as released) keeps the final-norm output at position t-1, the state that *predicts* the thinking token;
``position="token"`` keeps the state at the thinking token itself (position t; the last generated token is never
fed back and so has no such state).

    >>> model, processor = load_for_inference("runs/heima/recover")
    >>> records = generate(model, processor, [{"id": "1", "question": "...", "image": "a.png"}], capture=True)
    >>> save_hidden_states(records, "runs/heima/hidden")     # safetensors shards + index.jsonl
    >>> export("runs/heima/recover", "runs/heima/merged")     # standalone checkpoint (load_model / from_pretrained)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
from latent_core.readers import CONCLUSION_TAG, reasoning_token_count
from latent_core.thinking import STATES_INDEX_NAME, load_states, parse_thinking_token, write_states_shard
from PIL import Image

__all__ = [
    "CONCLUSION_TAG",
    "HIDDEN_INDEX_NAME",
    "HeimaGeneration",
    "ThinkingState",
    "count_tokens",
    "export",
    "generate",
    "load_for_inference",
    "load_hidden_states",
    "save_hidden_states",
    "thinking_token_ids",
]

HIDDEN_INDEX_NAME = STATES_INDEX_NAME
_CONCLUSION = re.compile(r"<CONCLUSION>(.*?)(?:</CONCLUSION>|$)", re.DOTALL)
_EXPORT_INFO_NAME = "heima_export.json"


class ThinkingState(TypedDict):
    """The hidden state of one generated thinking token.

    ``stage``: the stage the token stands for (``"summary"``...; ``None`` for a token not named
    ``<THINKING_OF_...>``); ``token``: the token string; ``position``: index of the thinking token among the
    generated tokens (0 = first new token); ``column``: the column of the recorded state in the padded output
    (``position`` + prompt columns, minus 1 for ``"predictor"``); ``mode``: ``"predictor"`` or ``"token"``;
    ``hidden``: ``[hidden_size]`` final-norm output (CPU).
    """

    stage: str | None
    token: str
    position: int
    column: int
    mode: str
    hidden: torch.Tensor


class HeimaGeneration(TypedDict, total=False):
    """One sample's generation (a plain dict; see :func:`generate`)."""

    id: str
    question: str
    text: str
    generated_tokens: int
    reasoning_tokens: int
    thinking_tokens: int
    answer: str
    latency_s: float
    token_ids: list[int]
    image: str
    hidden_states: list[ThinkingState]


# ---------------------------------------------------------------------------------------------------------------
# Tokens and counting
# ---------------------------------------------------------------------------------------------------------------


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def thinking_token_ids(processor: Any) -> dict[str, int]:
    """The thinking tokens the tokenizer knows (``<THINKING_OF_SUMMARY>``, ``<THINKING_OF_CAPTION_2>``, ...) -> id,
    in id order."""
    tokenizer = _tokenizer(processor)
    found = {tok: int(i) for tok, i in tokenizer.get_added_vocab().items() if parse_thinking_token(tok)}
    return dict(sorted(found.items(), key=lambda item: item[1]))


def _stage_of(token: str) -> str | None:
    parsed = parse_thinking_token(token)
    return parsed[0] if parsed else None


def _eos_ids(model: Any, processor: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos])
    ids.add(_tokenizer(processor).eos_token_id)
    return {int(i) for i in ids if i is not None}


def count_tokens(ids: Sequence[int], tokenizer: Any, thinking_ids: Iterable[int], eos_ids: Iterable[int]) -> dict:
    """Token counts of one sample's new tokens ``ids`` (anything after the first EOS is ignored).

    Returns ``{"generated_tokens", "reasoning_tokens", "thinking_tokens", "truncated", "kept"}``: tokens up to and
    including the first EOS (all if none); tokens before the one where ``<CONCLUSION>`` starts
    (:func:`latent_core.readers.reasoning_token_count`; without a conclusion every generated token counts, EOS
    included); generated thinking-token ids; whether no EOS came (cut at the budget); and the kept ids
    (``ids[:generated_tokens]``).
    """
    ids = [int(i) for i in ids]
    eos = set(eos_ids)
    n = next((k + 1 for k, token in enumerate(ids) if token in eos), len(ids))
    kept = ids[:n]
    thinking = set(thinking_ids)
    ended = bool(kept) and kept[-1] in eos
    body = kept[:-1] if ended else kept
    before = reasoning_token_count(tokenizer, body)
    return {
        "generated_tokens": n,
        "reasoning_tokens": before if before < len(body) else n,
        "thinking_tokens": sum(token in thinking for token in kept),
        "truncated": not ended,
        "kept": kept,
    }


# ---------------------------------------------------------------------------------------------------------------
# Loading and export
# ---------------------------------------------------------------------------------------------------------------


def load_for_inference(
    stage_dir: str | Path,
    base_model: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """Load a Heima stage output (or an exported checkpoint) for generation: ``(model, processor)``, eval mode.

    :func:`latent_core.inference.load_trained` with Heima's thinking tokens: those of ``latent_stage.json``, else
    the ``<THINKING_OF_...>`` tokens the saved tokenizer knows. A stage directory (``adapter_config.json`` +
    ``latent_stage.json`` + saved processor, as :class:`latent_core.LatentTrainer` writes it): the processor saved
    there, the base model (``base_model`` if given, else the adapter's ``base_model_name_or_path``, else
    ``latent_stage.json``'s ``base_model``), the thinking tokens added with the tokenizer's ids, the adapter and the
    extra modules (``TrainableRows``) if any. A directory with ``config.json`` and no adapter is an exported
    checkpoint and loads with ``load_model``.

    Args:
        stage_dir: the stage output or exported checkpoint directory.
        base_model: the base model (alias, Hub id or path) to put the adapter on; default: the one it was trained on.
        dtype: load the base model in this dtype (default: the checkpoint's).
        device: move the model there (default: CUDA when available, else CPU).

    Raises:
        FileNotFoundError: ``stage_dir`` is neither a stage output nor a checkpoint.
        latent_core.StageError: the adapter or extra modules do not fit the base model.
        latent_core.FamilyError: the model cannot take images (Heima's :data:`~heima.config.SUPPORTED_FAMILIES`).
    """
    from latent_core.inference import load_trained

    from heima.config import SUPPORTED_FAMILIES

    return load_trained(
        stage_dir, base_model, dtype=dtype, device=device, default_tokens=lambda p: list(thinking_token_ids(p)),
        families=SUPPORTED_FAMILIES, method="heima",
    )  # fmt: skip


def export(
    stage_dir: str | Path, out_dir: str | Path, base_model: str | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Merge a stage output into a standalone checkpoint (``latent_core.lora.export_merged``): weights with LoRA and
    the thinking-token rows folded in, plus the processor with the thinking tokens. It loads with
    ``latent_core.load_model`` or plain ``from_pretrained`` (no PEFT needed) and generates the same tokens.

    Returns:
        ``Path(out_dir)``.
    """
    from latent_core.lora import export_merged
    from latent_core.trainer import stage_info

    model, processor = load_for_inference(stage_dir, base_model, device="cpu")
    out = export_merged(model, processor, out_dir, dtype, copy_model=False)
    info = {"source": str(stage_dir), "tokens": list(thinking_token_ids(processor)), "stage": stage_info(stage_dir)}
    (out / _EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def _image(sample: dict[str, Any], image_root: Path | None) -> Image.Image | None:
    image = sample.get("image")
    if image is None or isinstance(image, Image.Image):
        return image.convert("RGB") if image is not None else None
    path = Path(image)
    root = image_root or (Path(sample["images_root"]) if sample.get("images_root") else None)
    if root is not None and not path.is_absolute():
        path = root / path
    try:
        with Image.open(path) as handle:
            return handle.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"sample {sample.get('id')!r}: cannot read image {str(path)!r} ({err})") from err


def _image_path(sample: dict[str, Any], image_root: Path | None) -> str | None:
    """The sample's image as a path string (resolved against the root), ``None`` for PIL images or no image."""
    image = sample.get("image")
    if not isinstance(image, str | Path):
        return None
    root = image_root or (Path(sample["images_root"]) if sample.get("images_root") else None)
    path = Path(image)
    return str(root / path if root is not None and not path.is_absolute() else path)


def _prompt_inputs(processor: Any, samples: Sequence[dict[str, Any]], image_root: Path | None) -> Any:
    """Left-padded inputs: one user turn (image + question) built by :mod:`latent_core.prompts`, the builder the
    training collator (``latent_core.collate.SupervisedCollator``) uses, with the generation prompt."""
    from latent_core.prompts import encode_chats, render_prompts

    images = [_image(s, image_root) for s in samples]
    if any(i is None for i in images) and not all(i is None for i in images):
        raise ValueError("a batch mixes samples with and without images; generate them separately")
    text_only = not hasattr(processor, "image_processor")
    chats = render_prompts(processor, [str(s["question"]) for s in samples], [int(i is not None) for i in images],
                           text_only)  # fmt: skip
    groups = None if images[0] is None else [[image] for image in images]
    return encode_chats(processor, chats, groups, padding_side="left")


def generate(
    model: Any,
    processor: Any,
    samples: Sequence[dict[str, Any]],
    max_new_tokens: int = 256,
    capture: bool = False,
    position: Literal["predictor", "token"] = "predictor",
    batch_size: int = 8,
    *,
    image_root: str | Path | None = None,
) -> list[HeimaGeneration]:
    """Greedy, batched (left-padded) generation with token accounting and optional thinking-state capture.

    Args:
        model: a Heima model (:func:`load_for_inference`, a PEFT model from training, or an exported checkpoint).
        processor: its processor (with the thinking tokens).
        samples: ``{"id", "question", "image"}`` dicts; ``image`` a path (relative to ``image_root`` or the sample's
            ``images_root``), a PIL image or ``None``.
        max_new_tokens: generation budget per sample.
        capture: record the hidden state (final-norm output) of every generated thinking token during generation
            (``latent_core.capture`` hooks on the KV-cached decoding; nothing is re-run).
        position: ``"predictor"`` (state at t-1 that predicts the thinking token; the authors' choice, default) or
            ``"token"`` (state at the thinking token t).
        batch_size: samples per ``generate`` call.
        image_root: directory for relative image paths.

    Returns:
        One dict per sample, in order: ``id``, ``question``, ``text`` (new tokens up to EOS, thinking tokens shown,
        EOS and padding not), ``generated_tokens`` (up to and including EOS), ``reasoning_tokens`` (before the token
        where ``<CONCLUSION>`` starts; all generated tokens when there is none), ``thinking_tokens`` (thinking ids
        generated), ``answer`` (the conclusion text, stripped; the whole text without special tokens when there is
        no conclusion), ``latency_s`` (batch wall time / batch size), ``token_ids`` (the kept new ids), ``image`` (the
        image path, when the sample gave one) and, with
        ``capture``, ``hidden_states``: a list of :class:`ThinkingState`.
    """
    from latent_core.capture import capture_hidden_states, select_predictors, select_tokens

    if position not in ("predictor", "token"):
        raise ValueError(
            f"position must be 'predictor' (state at t-1, default) or 'token' (state at t), got {position!r}"
        )
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    tokenizer = _tokenizer(processor)
    thinking = thinking_token_ids(processor)
    by_id = {i: tok for tok, i in thinking.items()}
    if capture and not thinking:
        raise ValueError(
            "capture=True needs thinking tokens (<THINKING_OF_...>) in the tokenizer; this processor has none: "
            "load a Heima stage with load_for_inference"
        )
    eos = _eos_ids(model, processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    root = Path(image_root) if image_root is not None else None
    device = next(model.parameters()).device
    results: list[HeimaGeneration] = []
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        began = time.perf_counter()
        inputs = _prompt_inputs(processor, batch, root).to(device)
        prompt_len = inputs["input_ids"].shape[1]
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)
        with torch.inference_mode():
            if capture:
                select = select_predictors if position == "predictor" else select_tokens
                with capture_hidden_states(model, select(list(thinking.values())), device="cpu") as recorder:
                    out = model.generate(**inputs, **gen_kwargs)
                    recorder.finalize(out)
            else:
                out = model.generate(**inputs, **gen_kwargs)
        latency = (time.perf_counter() - began) / len(batch)
        new = out[:, prompt_len:].cpu()
        for b, sample in enumerate(batch):
            counts = count_tokens(new[b].tolist(), tokenizer, thinking.values(), eos)
            kept = counts.pop("kept")
            shown = [i for i in kept if i not in eos and i != pad]
            text = tokenizer.decode(shown, skip_special_tokens=False).strip()
            match = _CONCLUSION.search(text)
            answer = match.group(1).strip() if match else tokenizer.decode(shown, skip_special_tokens=True).strip()
            record: HeimaGeneration = {
                "id": str(sample.get("id", start + b)),
                "question": str(sample.get("question", "")),
                "text": text,
                **counts,
                "answer": answer,
                "latency_s": latency,
                "token_ids": kept,
            }
            image = _image_path(sample, root)
            if image is not None:
                record["image"] = image
            if capture:
                record["hidden_states"] = _states(recorder, b, prompt_len, len(kept), position, by_id)
            results.append(record)
    return results


def _states(recorder: Any, b: int, prompt_len: int, n_kept: int, mode: str, by_id: dict[int, str]) -> list:
    """The recorded thinking states of batch row ``b`` (generated thinking tokens before EOS only)."""
    shift = 1 if mode == "predictor" else 0
    states = []
    for row, column, token_id in zip(recorder.states[b], recorder.positions[b], recorder.token_ids[b], strict=True):
        index = column + shift - prompt_len  # index of the thinking token among the new tokens
        if not 0 <= index < n_kept:
            continue  # a thinking token inside the prompt (token mode), never one of ours to report
        token = by_id[int(token_id)]
        states.append(
            ThinkingState(stage=_stage_of(token), token=token, position=index, column=column, mode=mode, hidden=row)
        )
    return states


# ---------------------------------------------------------------------------------------------------------------
# Hidden states on disk
# ---------------------------------------------------------------------------------------------------------------


def save_hidden_states(
    records: Sequence[HeimaGeneration], out_dir: str | Path, shard_size: int = 256, *, overwrite: bool = True
) -> Path:
    """Write the thinking states of ``records`` (from ``generate(capture=True)``) in the one states format of
    :mod:`latent_core.thinking` (the format ``interpreters capture`` writes and ``interpreters decode`` reads):
    ``shard-00000.safetensors``.. (``shard_size`` records each) and ``index.jsonl``, one line per state with ``id``,
    ``stage``, ``token``, ``question``, ``position`` (the recorded column), ``mode``, ``generated_index`` (the
    thinking token's index among the generated tokens), ``image`` (when the sample's image was a path) and no
    ``target``: these are the states the model produced while answering. Returns the index path.

    Raises:
        ValueError: a record has no ``hidden_states`` (generated without ``capture=True``).
    """
    out = Path(out_dir)
    for record in records:
        if "hidden_states" not in record:
            raise ValueError(f"record {record.get('id')!r} has no hidden_states: generate with capture=True")
    if overwrite:
        for old in [*out.glob("shard-*.safetensors"), out / HIDDEN_INDEX_NAME]:
            old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for j, first in enumerate(range(0, len(records), shard_size)):
        entries, tensors = [], []
        for record in records[first : first + shard_size]:
            for state in record["hidden_states"]:
                entry = {
                    "id": record["id"],
                    "stage": state["stage"],
                    "token": state["token"],
                    "question": record.get("question", ""),
                    "position": state["column"],
                    "generated_index": state["position"],
                    "mode": state["mode"],
                }
                if record.get("image") is not None:
                    entry["image"] = record["image"]
                entries.append(entry)
                tensors.append(state["hidden"])
        write_states_shard(out, j, entries, tensors)
    return out / HIDDEN_INDEX_NAME


def load_hidden_states(out_dir: str | Path) -> list[dict[str, Any]]:
    """Read a states directory (:func:`latent_core.thinking.load_states`): the index lines, each with its tensor
    under ``"hidden"``."""
    return load_states(out_dir)
