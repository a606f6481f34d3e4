"""`latent demo`: every tiny model family through the real loading path, processor, forward and greedy generate.

For each family of the tiny model zoo (`latent_core.testing`): build the model, ``save_pretrained`` it with its
processor, load both back through `latent_core.load_model` / `load_processor` (the code path a real checkpoint
takes), apply the chat template to the demo image and question from ``data/demo``, run one forward and one
greedy ``generate``, and report parameters, tokens and milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

DEMO_DIR_NAME = Path("data") / "demo"


@dataclass
class DemoRecord:
    family: str
    model_class: str
    processor_class: str
    params: int
    prompt_tokens: int
    generated_tokens: int
    forward_ms: float
    generate_ms: float
    text: str


def find_demo_data(explicit: Path | None = None) -> Path:
    """The demo's ``questions.jsonl``: ``explicit`` if given, else ``data/demo`` above the cwd or this checkout."""
    if explicit is not None:
        path = explicit / "questions.jsonl" if explicit.is_dir() else explicit
        if not path.is_file():
            raise FileNotFoundError(f"demo data not found at {path}: pass --data pointing at a questions.jsonl")
        return path
    starts = [Path.cwd(), Path(__file__).resolve()]
    for start in starts:
        for parent in [start, *start.parents]:
            candidate = parent / DEMO_DIR_NAME / "questions.jsonl"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        "demo data (data/demo/questions.jsonl) not found above the current directory or the installed package: "
        "run from a checkout of the repository or pass --data"
    )


def load_demo_question(path: Path) -> tuple[Image.Image, str]:
    """The first record of the demo JSONL: its image (relative to the file) and question."""
    with open(path) as f:
        record = json.loads(f.readline())
    image_path = path.parent / record["image"]
    return Image.open(image_path).convert("RGB"), record["question"]


def _prepare_inputs(processor, family: str, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
    if family == "causal_lm":
        messages = [{"role": "user", "content": question}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return processor([text], return_tensors="pt", add_special_tokens=False)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=False)


def _count_generated(new_tokens: torch.Tensor, eos_ids: set[int]) -> int:
    """Tokens up to and including the first end-of-sequence token."""
    for i, token in enumerate(new_tokens.tolist()):
        if token in eos_ids:
            return i + 1
    return len(new_tokens)


def run_family(family: str, image: Image.Image, question: str, max_new_tokens: int = 16) -> DemoRecord:
    """One family through save -> load -> processor -> forward -> greedy generate."""
    from latent_core import family_of, load_model, load_processor
    from latent_core.testing import tiny_model

    built, built_processor = tiny_model(family)
    with tempfile.TemporaryDirectory(prefix=f"latent-demo-{family}-") as tmp:
        built.save_pretrained(tmp)
        built_processor.save_pretrained(tmp)
        model = load_model(tmp).eval()
        processor = load_processor(tmp)
    assert family_of(model).name == family, (family_of(model).name, family)
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = _prepare_inputs(processor, family, image, question)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        model(**inputs)  # warm-up: first calls pay one-off allocation costs
        start = time.perf_counter()
        model(**inputs)
        forward_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        generate_ms = (time.perf_counter() - start) * 1000
    new = out[0, prompt_len:]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    return DemoRecord(
        family=family,
        model_class=type(model).__name__,
        processor_class=type(processor).__name__,
        params=sum(p.numel() for p in model.parameters()),
        prompt_tokens=prompt_len,
        generated_tokens=_count_generated(new, eos_ids),
        forward_ms=round(forward_ms, 2),
        generate_ms=round(generate_ms, 2),
        text=tokenizer.decode(new, skip_special_tokens=False),
    )


def write_summary(records: list[DemoRecord], out_dir: Path, seconds: float, extra: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    summary = {"command": "demo", "seconds": round(seconds, 2), "families": [asdict(r) for r in records]}
    summary.update(extra or {})
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def run_heima(work: Path, steps: int = 2, max_new_tokens: int = 24) -> dict:
    """Heima end to end on the LLaVA-CoT fixtures with the tiny mllama: prepare, the progressive stages 0..3 and
    the recovering stage (``steps`` optimizer steps each, each stage starting from the previous one), then
    greedy generation with the thinking tokens' hidden states captured on the KV cache."""
    from heima.config import HeimaConfig
    from heima.data import prepare
    from heima.generate import generate, load_for_inference
    from heima.trainer import train_stage
    from latent_core.testing import tiny_model

    fixtures = find_demo_data().parents[1] / "fixtures" / "llava_cot"
    start = time.perf_counter()
    base = work / "tiny-mllama"
    model, processor = tiny_model("mllama")
    model.save_pretrained(base)
    processor.save_pretrained(base)
    dataset, report = prepare(fixtures / "train.jsonl", fixtures, work / "prepared", progress=False)
    config = HeimaConfig(
        output_dir=str(work / "run"),
        model=str(base),
        run_dir=str(work / "run"),
        prepared=str(work / "prepared"),
        max_steps=steps,
        per_device_train_batch_size=2,
        recover_batch_size=2,
        learning_rate=1e-3,
        recover_learning_rate=1e-3,
        warmup_steps=0,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
    )
    stages: list[int | str] = [0, 1, 2, 3, "recover"]
    losses = {}
    for stage in stages:
        with contextlib.redirect_stdout(io.StringIO()):  # HF prints every log line when its progress bar is off
            out = train_stage(config, stage)
        summary = json.loads((out / "heima_train.json").read_text())
        losses[str(stage)] = summary["last_loss"]
    train_seconds = time.perf_counter() - start
    model, processor = load_for_inference(work / "run" / "recover")
    image_path = find_demo_data().parent / "shapes.png"
    samples = [{"id": "demo", "question": "How many red circles are there?", "image": image_path}]
    records = generate(model, processor, samples, max_new_tokens=max_new_tokens, capture=True)
    record = records[0]
    interpreters = run_interpreters(work, steps=60)
    return {
        "interpreters": interpreters,
        "records": len(dataset),
        "skipped": dict(report.skipped),
        "stages": [str(s) for s in stages],
        "final_losses": losses,
        "train_seconds": round(train_seconds, 2),
        "generated_tokens": record["generated_tokens"],
        "reasoning_tokens": record["reasoning_tokens"],
        "thinking_tokens": record["thinking_tokens"],
        "captured_states": len(record.get("hidden_states", [])),
        "latency_s": round(record["latency_s"], 4),
    }


def run_interpreters(work: Path, steps: int = 10) -> dict:
    """The interpreter pipeline on the demo's tiny Heima (``work/run/recover``): capture the thinking tokens'
    states teacher-forced on the prepared data, train one unified tiny interpreter (causal_lm) for ``steps``
    steps, decode with the zero / shuffled controls, and score BLEU-4, ROUGE-L and (when WordNet is installed)
    METEOR. BERTScore and the LLM judge are left to `interpreters score` (model download / API key)."""
    from interpreters.capture import capture
    from interpreters.config import InterpreterConfig
    from interpreters.decode import decode
    from interpreters.metrics import MeteorDataError, ensure_wordnet
    from interpreters.score import score
    from interpreters.trainer import train_interpreter
    from latent_core.testing import tiny_model

    start = time.perf_counter()
    summary = capture(work / "run" / "recover", work / "prepared", work / "capture", show_progress=False)
    base = work / "tiny-interpreter"
    model, tokenizer = tiny_model("causal_lm")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = InterpreterConfig(
        output_dir=str(work / "interpreters"),
        run_dir=str(work / "interpreters"),
        model=str(base),
        max_steps=steps,
        learning_rate=3e-3,
        warmup_steps=0,
        per_device_train_batch_size=8,
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trained = train_interpreter(config, work / "capture", stage="all", unified=True)
    decoded = decode(trained, work / "capture", work / "decoded", max_new_tokens=16, show_progress=False)
    metrics = ["bleu", "rouge"]
    try:
        ensure_wordnet()
        metrics.append("meteor")
    except MeteorDataError:
        pass
    result = score(decoded, work / "scores", metrics=tuple(metrics))
    return {
        "states": summary.get("states"),
        "metrics": metrics,
        "scores": result["scores"],
        "gap": result["gap"],
        "seconds": round(time.perf_counter() - start, 2),
    }
