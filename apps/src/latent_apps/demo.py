"""`latent demo`: every tiny model family through the real loading path, then the shipped models on the shapes task.

For each family of the tiny model zoo (`latent_core.testing`): build the model, ``save_pretrained`` it with its
processor, load both back through `latent_core.load_model` / `load_processor` (the code path a real checkpoint
takes), apply the chat template to the demo image and question from ``data/demo``, run one forward and one
greedy ``generate``, and report parameters, tokens and milliseconds.

Then the evidence that the methods work (:func:`run_shipped`): the shipped base trained from scratch with CoT
answers (``data/base/mllama``) and the shipped Heima made from it by ``reproduce heima``
(``data/reproduced/heima-mllama``) answer the same shapes test questions, each also with blank images.

The proving ground (:func:`run_proving_ground`, issue 26): the mixed CoT + direct base (``data/base/mllama-mix``)
and the Coconut made from it by ``reproduce all`` (``data/reproduced/proving-ground``) on the multi-hop shapes test
questions, with the controls, and the headline of the shipped table.
"""

from __future__ import annotations

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


SHIPPED_FAMILY = "mllama"


def shipped_paths(family: str = SHIPPED_FAMILY) -> dict[str, Path]:
    """The checkout's shipped models of ``family``: the base (``data/base/<family>``, made by ``make-base``) and the
    recovered Heima exported by ``reproduce heima`` (``data/reproduced/heima-<family>/model``)."""
    root = find_demo_data().parents[2]
    return {
        "base": root / "data" / "base" / family,
        "heima": root / "data" / "reproduced" / f"heima-{family}" / "model",
    }


def run_shipped(work: Path, family: str = SHIPPED_FAMILY, n: int = 48, batch_size: int = 48) -> dict:
    """The shipped base (CoT) and the shipped recovered Heima on the first ``n`` questions of the base's own shapes
    test split (regenerated from its ``make_base.json``), through ``latent eval`` with the training prompt: accuracy,
    the blank-image control, the majority baseline, generated / thinking tokens, truncated and unanswered counts."""
    from latent_apps.base import base_shapes
    from latent_apps.eval.runner import run_eval
    from latent_apps.reproduce.common import eval_row

    paths = shipped_paths(family)
    for name, path in paths.items():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the shipped {name} model {path} is missing: run from a full checkout")
    start = time.perf_counter()
    shapes = base_shapes(paths["base"], work / "shapes")
    bench = shapes / "test" / "llava_cot.jsonl"
    rows = {}
    for label, method in (("base", "cot"), ("heima", "heima")):
        summary = run_eval(
            str(paths[label]), method, [bench], work / "eval" / label, batch_size=batch_size, limit=n, blank=True,
            show_progress=False,
        )["benches"][bench.stem]  # fmt: skip
        rows[label] = eval_row(summary)
    return {"family": family, "n": n, "rows": rows, "seconds": round(time.perf_counter() - start, 2)}


PROVING_GROUND = Path("data") / "reproduced" / "proving-ground"
"""``reproduce all``'s shipped output: ``results.json`` / ``.md``, its plot, and ``coconut/`` (seed 0's Coconut)."""


def run_proving_ground(work: Path, n: int = 48, batch_size: int = 48) -> dict:
    """The proving ground (multi-hop questions, a base trained on CoT and direct answers) from shipped artefacts:
    the mixed base (``data/base/mllama-mix``) asked with its chain of thought and directly, and seed 0's Coconut
    of ``reproduce all`` (``data/reproduced/proving-ground/coconut``), on the first ``n`` questions of the base's
    own test split, with blank images and Coconut's thoughts zeroed / shuffled; then the headline of the shipped
    table (every row's seed mean and spread over the full evaluation) and its targets."""
    from latent_apps.base import base_shapes
    from latent_apps.reproduce.common import EvalJob, eval_rows

    root = find_demo_data().parents[2]
    ground, base = root / PROVING_GROUND, root / "data" / "base" / "mllama-mix"
    for path in (base / "config.json", ground / "coconut" / "config.json", ground / "results.json"):
        if not path.is_file():
            raise FileNotFoundError(f"the shipped proving-ground artefact {path} is missing: run from a full checkout")
    start = time.perf_counter()
    shapes = base_shapes(base, work / "shapes-hops")
    jobs = [EvalJob("CoT (the base)", base, "cot", None, 512, work / "eval" / "cot"),
            EvalJob("direct (the base)", base, "direct", None, 32, work / "eval" / "direct"),
            EvalJob("Coconut, seed 0", ground / "coconut", "coconut", {"diagnostics": True}, 64,
                    work / "eval" / "coconut")]  # fmt: skip
    rows = eval_rows(jobs, shapes / "test" / "llava_cot.jsonl", n, batch_size)
    shipped = json.loads((ground / "results.json").read_text())
    return {"n": n, "rows": rows, "table": shipped["table"], "targets": shipped["targets"],
            "hop_shortcut": shipped.get("hop_shortcut") or {},
            "command": shipped["command"], "made_by": shipped.get("made_by"),
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def run_lavit(work: Path, out: Path, build_questions: int = 32, steps: int = 20, n: int = 4) -> dict:
    """LaViT's pipeline on the shipped bases, in brief: ``build-lavit-15k`` with the small Qwen2.5-VL base as teacher
    on the first ``build_questions`` train questions, ``steps`` training steps of a LaViT student from the tiny base,
    then the student's latent decoding and the teacher's on ``n`` test questions with side-by-side attention overlays
    written to ``out/overlays`` (:func:`lavit.analysis.analyze_models`). A pipeline check: the claim is
    ``reproduce lavit``'s (README)."""
    from latent_core.inference import load_trained
    from latent_core.readers import read_questions
    from lavit.analysis import analyze_models
    from lavit.build import BuildConfig, build
    from lavit.config import LavitConfig
    from lavit.inputs import InputSettings
    from lavit.teacher import TeacherOptions
    from lavit.trainer import train_student

    from latent_apps.base import base_shapes
    from latent_apps.reproduce.lavit import OWN_INPUTS  # the shapes bases' own inputs

    root = find_demo_data().parents[2] / "data" / "base"
    teacher, student = root / "qwen2_5_vl-small", root / "qwen2_5_vl"
    start = time.perf_counter()
    shapes = base_shapes(teacher, work / "shapes")
    config = BuildConfig(
        data=str(shapes / "train" / "visual_cot.jsonl"), images=str(shapes), out=str(work / "teacher-data"),
        teacher=str(teacher), options=TeacherOptions(max_new_tokens=400), batch_size=build_questions,
        limit=build_questions, overlays=0, inputs=InputSettings.own(),
    )  # fmt: skip
    manifest = build(config, *load_trained(str(teacher), families=("qwen2_5_vl",)))
    args = LavitConfig.preset(
        "paper", output_dir=str(work / "lavit"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        gate_warmup=steps // 2, logging_steps=5, report_to=[], remove_unused_columns=False, save_strategy="no",
        disable_tqdm=True, **OWN_INPUTS,
    )  # fmt: skip
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        trained = train_student(args, work / "teacher-data", str(student), work / "lavit")
    samples = read_questions(shapes / "test" / "shapes_mc.tsv", n)
    models = {"teacher": str(teacher), "LaViT (demo)": str(work / "lavit" / "student")}
    analysis = analyze_models(
        models, samples, out, teacher="teacher", batch_size=n, max_new_tokens=400, overlays=n,
        plain_inputs=InputSettings.own(),
    )  # fmt: skip
    return {
        "build": manifest["counts"],
        "train": {k: trained.get(k) for k in ("steps", "samples", "first_loss", "last_loss")},
        "analysis": analysis["models"],
        "answers": [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()],
        "overlays": str(out / "overlays"),
        "seconds": round(time.perf_counter() - start, 2),
    }


def run_lare(work: Path, stage2_steps: int = 10, n: int = 4, threshold: float = 0.05) -> dict:
    """LaRe's pipeline on the shipped llava base, in brief: ``<bot>`` / ``<eot>`` and a fresh extractor added
    (:func:`lare.from_llava`), two steps of stage I and ``stage2_steps`` of stage II on the base's shapes reasoning
    texts (L_align and L_text; L_img needs a KL VAE, which is not shipped), then decoding of ``n`` test questions
    with adaptive halting (cosine distance < ``threshold``), each sample's latent steps shown. A pipeline check:
    the claim needs the training and reproduction of issue 16."""
    import contextlib
    import io

    from lare import LareConfig, from_llava, generate_answers, load_lare
    from lare.config import LareTrainConfig
    from lare.trainer import train_stage
    from latent_core.readers import read_questions, read_reasoning

    from latent_apps.base import base_shapes

    root = find_demo_data().parents[2] / "data" / "base" / "llava"
    start = time.perf_counter()
    try:
        shapes = base_shapes(root, work / "shapes")  # the same data set as the LaViT section's when the bases share it
    except ValueError:
        shapes = base_shapes(root, work / "shapes-llava")
    model, processor = from_llava(str(root), LareConfig(extractor_hidden=128, extractor_heads=4))
    init = model.save_pretrained(work / "lare-init", processor)
    rows = list(read_reasoning(shapes / "train" / "reasoning.jsonl", shapes))[:64]
    run = work / "lare"
    trained = {}
    for stage, steps, rate in ((1, 2, 1e-3), (2, stage2_steps, 1e-3)):
        config = LareTrainConfig(
            output_dir=str(run / f"stage-{stage}"), per_device_train_batch_size=8, max_steps=steps,
            learning_rate=rate, img_weight=0.0, logging_steps=1, report_to=[], remove_unused_columns=False,
            save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            summary = train_stage(config, stage, rows, init, run)
        trained[stage] = {k: summary.get(k) for k in ("steps", "first_loss", "last_loss", "terms")}
    loaded, loaded_processor = load_lare(run / "stage-2")
    samples = read_questions(shapes / "test" / "shapes_mc.tsv", n)
    answers = generate_answers(
        loaded, loaded_processor, [s["image"] for s in samples], [s["text"] for s in samples], 24, halt="cos",
        threshold=threshold,
    )  # fmt: skip
    return {
        "train": trained,
        "threshold": threshold,
        "answers": [
            {"id": s["id"], "gold": s["answer"], "latent_steps": steps, "answer": text}
            for s, steps, text in zip(samples, answers.latent_steps, answers.texts, strict=True)
        ],
        "seconds": round(time.perf_counter() - start, 2),
    }
