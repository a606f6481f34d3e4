"""make-base: a few dozen steps on a handful of questions lower the loss and save a checkpoint that the loaders and
the method CLIs take; a killed run resumes to the same weights; the shipped bases answer fresh questions right and
fall to chance with blank images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from latent_apps.base import BASE_FAMILIES, MAKE_BASE_NAME, base_shapes, build_base, make_base
from latent_apps.shapes import make_shapes
from latent_core import family_of, load_model, load_processor
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
# the shipped VLM bases (data/base/README.md) and the accuracy each must reach on 40 fresh questions: 0.8 for those
# at 90.8-99.5% on their 400 test questions; the small Qwen2.5-VL is at 79.8% (it stopped short of the 90% bar)
SHIPPED = {"mllama": 0.8, "qwen2_5_vl": 0.8, "llava": 0.8, "qwen2_5_vl-small": 0.65, "llava-mix": 0.8}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(6, 1, out, test_fraction=0.34)
    return out


@pytest.mark.parametrize("family", BASE_FAMILIES)
def test_build_base_is_the_real_class(family):
    model, processor = build_base(family)
    assert family_of(model).name == family
    if family != "causal_lm":
        assert type(processor).__name__.endswith("Processor")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "causal_lm"])
def test_make_base_lowers_the_loss_and_saves_a_loadable_model(family, shapes, tmp_path):
    out = tmp_path / family
    summary = make_base(
        family, shapes, out, steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=2, threads=1, eval_samples=4,
        eval_batch_size=4, show_progress=False,
    )  # fmt: skip
    losses = [loss for _, loss in summary["loss_curve"]]
    assert summary["steps"] == 30 and losses[-1] < 0.6 * losses[0]
    assert json.loads((out / MAKE_BASE_NAME).read_text())["shapes_args"]["n"] == 6
    assert not (out / "checkpoints").exists()
    model = load_model(str(out))
    processor = load_processor(str(out))
    assert family_of(model).name == family
    assert getattr(processor, "tokenizer", processor).chat_template
    assert summary["eval"]["n"] == 4 and "blank_accuracy" in summary["eval"]


@pytest.mark.slow
def test_heima_and_interpreter_clis_take_the_made_bases(shapes, tmp_path):
    """A made VLM base trains a Heima stage through the heima CLI; a made text base is an interpreter LM."""
    from heima.cli import app as heima_app
    from typer.testing import CliRunner

    vlm = tmp_path / "vlm"
    make_base("mllama", shapes, vlm, steps=2, batch_size=4, threads=1, eval_samples=0, show_progress=False)
    runner = CliRunner()
    prepared = tmp_path / "prepared"
    result = runner.invoke(
        heima_app,
        ["prepare", "--data", str(shapes / "train" / "llava_cot.jsonl"), "--images", str(shapes)]
        + ["--out", str(prepared)],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        heima_app,
        ["train", "--stage", "0", "--prepared", str(prepared), "--model", str(vlm), "--run-dir", str(tmp_path / "run"),
         "--max-steps", "1", "--batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "stage-0" / "adapter_model.safetensors").is_file()

    from interpreters.model import build_interpreter

    text = tmp_path / "text"
    make_base("causal_lm", shapes, text, steps=2, batch_size=4, threads=1, eval_samples=0, show_progress=False)
    model, tokenizer = load_model(str(text)), load_processor(str(text))
    interpreter = build_interpreter(model, tokenizer, hidden_size=64, r=4, alpha=8)
    assert interpreter.placeholder_id == tokenizer.convert_tokens_to_ids("<THOUGHT>")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(shapes, tmp_path, monkeypatch):
    from latent_core.trainer import LatentTrainer

    common = dict(steps=8, batch_size=4, learning_rate=3e-3, warmup_steps=1, threads=1, eval_samples=0)
    make_base("qwen2_5_vl", shapes, tmp_path / "straight", show_progress=False, **common)

    original = LatentTrainer.training_step
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")  # after the checkpoint of step 5
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LatentTrainer, "training_step", dying)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        make_base("qwen2_5_vl", shapes, out, save_steps=5, show_progress=False, **common)
    assert (out / "checkpoints" / "checkpoint-5").is_dir()
    monkeypatch.setattr(LatentTrainer, "training_step", original)
    summary = make_base("qwen2_5_vl", shapes, out, save_steps=5, show_progress=False, **common)
    assert summary["resumed_from"].endswith("checkpoint-5") and summary["steps"] == 8
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_make_base_refuses_a_folder_that_is_not_shapes(tmp_path):
    with pytest.raises(FileNotFoundError, match="make-shapes"):
        make_base("qwen2_5_vl", tmp_path, tmp_path / "out", steps=1)
    with pytest.raises(ValueError, match="make-base builds"):
        build_base("gemma3")
    with pytest.raises(FileNotFoundError, match="not a base made by make-base"):
        base_shapes(tmp_path, tmp_path / "shapes")


def test_base_shapes_rewrites_the_bases_data_and_refuses_another(shapes, tmp_path):
    """A base's data set comes back byte for byte from its make_base.json; a folder with other shapes is refused."""
    base = tmp_path / "base"
    base.mkdir()
    args = json.loads((shapes / "summary.json").read_text())
    made_with = {k: args[k] for k in ("n", "seed", "test_fraction")}
    (base / MAKE_BASE_NAME).write_text(json.dumps({"shapes_args": made_with}))
    again = base_shapes(base, tmp_path / "again")
    for name in ("train/llava_cot.jsonl", "test/llava_cot.jsonl", "scenes.json"):
        assert (again / name).read_bytes() == (shapes / name).read_bytes(), name
    assert base_shapes(base, again) == again  # already there: reused
    other = tmp_path / "other"
    make_shapes(3, 5, other)
    with pytest.raises(ValueError, match="another shapes data set"):
        base_shapes(base, other)


def test_base_shapes_rewrites_hop_questions_too(tmp_path):
    """A base trained on data with multi-hop questions gets them back: ``hops`` is one of the recorded arguments."""
    from latent_apps.base import shapes_args

    made = tmp_path / "made"
    make_shapes(6, 2, made, test_fraction=0.34, hops=(1, 3))
    base = tmp_path / "base"
    base.mkdir()
    (base / MAKE_BASE_NAME).write_text(json.dumps({"shapes_args": shapes_args(made)}))
    again = base_shapes(base, tmp_path / "again")
    for name in ("train/llava_cot.jsonl", "test/llava_cot.jsonl", "test/shapes_mc.tsv", "summary.json"):
        assert (again / name).read_bytes() == (made / name).read_bytes(), name
    assert "-hop3" in (again / "train" / "llava_cot.jsonl").read_text()


def test_base_shapes_reads_arguments_recorded_before_anchor_needed_as_any_anchor(tmp_path):
    """A base recorded before ``anchor_needed`` existed (no such key) gets its old hop questions back: drawn among
    every path, not the anchor-needed default; the folder it wrote is then reused, and a folder of the new
    default's questions is refused."""
    made = tmp_path / "made"
    make_shapes(8, 2, made, test_fraction=0.25, hops=(2, 3), anchor_needed=False)
    base = tmp_path / "base"
    base.mkdir()
    recorded = {"n": 8, "seed": 2, "test_fraction": 0.25, "hops": [2, 3]}  # as make_base.json had it
    (base / MAKE_BASE_NAME).write_text(json.dumps({"shapes_args": recorded}))
    again = base_shapes(base, tmp_path / "again")
    for name in ("train/llava_cot.jsonl", "test/llava_cot.jsonl", "test/shapes_mc.tsv"):
        assert (again / name).read_bytes() == (made / name).read_bytes(), name
    assert base_shapes(base, made) == made
    new = tmp_path / "new"
    make_shapes(8, 2, new, test_fraction=0.25, hops=(2, 3))
    assert (new / "train" / "llava_cot.jsonl").read_bytes() != (made / "train" / "llava_cot.jsonl").read_bytes()
    with pytest.raises(ValueError, match="another shapes data set"):
        base_shapes(base, new)


DIRECT_LINE = "Answer directly, without reasoning."


def test_a_mixed_base_trains_each_question_with_its_cot_and_its_direct_answer(shapes):
    from latent_apps.base import shapes_rows

    path = shapes / "train" / "llava_cot.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    rows = {r["id"]: r for r in shapes_rows(path, mix="cot+direct")}
    assert len(rows) == 2 * len(records)
    for record in records:
        human, gpt = (turn["value"] for turn in record["conversations"])
        cot, direct = rows[record["id"]], rows[record["id"] + "#direct"]
        assert cot["prompt"] == human.removeprefix("<image>\n") and cot["answer"] == gpt
        assert direct["prompt"] == cot["prompt"] + "\n" + DIRECT_LINE
        assert direct["answer"] == re.search(r"<CONCLUSION>(.+)</CONCLUSION>", gpt)[1]
        assert direct["image"] == cot["image"] == record["image"]
    assert len(shapes_rows(path)) == len(records)  # the default: CoT only, as the shipped bases were trained
    with pytest.raises(ValueError, match="unknown mix"):
        shapes_rows(path, mix="direct")


PARTIAL_LINE = "Answer with short reasoning."


def _row_totals(objects: list[dict], targets: list[tuple[str | None, str | None]], grid: int = 3) -> str:
    """The running counts at each row's end, from the scene itself (the reference of a partial answer)."""
    parts, counts = [], [0] * len(targets)
    for r in range(grid):
        for i, (colour, shape) in enumerate(targets):
            counts[i] += sum(o["row"] == r and colour in (None, o["colour"]) and shape in (None, o["shape"])
                             for o in objects)  # fmt: skip
        parts.append(f"row {r + 1}: {' '.join(map(str, counts))}.")
    return " ".join(parts)


def _targets(reasoning: str) -> list[tuple[str | None, str | None]]:
    """The (colour, shape) groups a count / exists / compare reasoning names ("Target: any circle.",
    "Targets: red and blue.", "Targets: circle and square.")."""
    from latent_apps.shapes import COLOURS

    one = re.match(r"Target: (\w+) (\w+)\.", reasoning)
    if one:
        colour, shape = one.groups()
        return [(None if colour == "any" else colour, None if shape == "shape" else shape)]
    a, b = re.match(r"Targets: (\w+) and (\w+)\.", reasoning).groups()
    return [(x, None) if x in COLOURS else (None, x) for x in (a, b)]


def test_a_partial_mix_adds_short_reasoning_with_one_running_count_per_row(tmp_path):
    """``cot+direct+partial``: a third row per question, asked with the partial line and answered with the
    reasoning alone (no summary, no caption); a counting scan becomes the running counts at each row's end, which
    are checked against the scene's objects, not against the scan they were cut from."""
    from latent_apps.base import shapes_rows

    made = tmp_path / "made"
    make_shapes(12, 3, made, test_fraction=0.25, hops=(2,))
    path = made / "train" / "llava_cot.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    scenes = json.loads((made / "scenes.json").read_text())
    rows = {r["id"]: r for r in shapes_rows(path, mix="cot+direct+partial")}
    assert len(rows) == 3 * len(records) and f"{records[0]['id']}#direct" in rows
    kinds = set()
    for record in records:
        gpt = record["conversations"][1]["value"]
        cot, partial = rows[record["id"]], rows[record["id"] + "#partial"]
        assert partial["prompt"] == cot["prompt"] + "\n" + PARTIAL_LINE and partial["image"] == cot["image"]
        reasoning = re.search(r"<REASONING>(.+)</REASONING>", gpt)[1]
        short = re.fullmatch(r"<REASONING>(.+)</REASONING>\n\n<CONCLUSION>(.+)</CONCLUSION>", partial["answer"])
        assert short and short[2] == re.search(r"<CONCLUSION>(.+)</CONCLUSION>", gpt)[1], partial["answer"]
        kind = record["category"]
        kinds.add(kind)
        if kind in ("count", "exists", "compare"):
            totals = _row_totals(scenes[record["image"]]["objects"], _targets(reasoning))
            head, tail = reasoning.split(" row 1 column 1: ")[0], reasoning[reasoning.index(" So ") :]
            assert short[1] == f"{head} {totals}{tail}", (short[1], totals)
            assert "column" not in short[1]
        else:  # colour and hops: the reasoning as it is, one short sentence per look-up
            assert short[1] == reasoning
    assert kinds == {"count", "exists", "colour", "compare", "hop2"}


def test_the_direct_method_asks_with_the_direct_line_and_the_others_do_not():
    from latent_apps.eval.methods import get_method

    asked = {"prompt": "What colour is the shape at row 1 column 1?"}
    choice = {"question": "Is there a red circle?", "options": {"A": "yes", "B": "no"}}
    direct = get_method("direct")
    assert direct.prompt_text(asked) == asked["prompt"] + "\n" + DIRECT_LINE
    lines = direct.prompt_text(choice).split("\n")
    assert lines[0] == choice["question"] and lines[-2:] == [
        "Please answer with the letter of the correct option.",
        DIRECT_LINE,
    ]
    for name in ("plain", "cot"):
        assert DIRECT_LINE not in get_method(name).prompt_text(asked) + get_method(name).prompt_text(choice)
    partial = get_method("partial")
    assert partial.prompt_text(asked) == asked["prompt"] + "\n" + PARTIAL_LINE and partial.staged
    assert partial.prompt_text(choice).split("\n")[-1] == PARTIAL_LINE


def test_a_direct_answer_is_read_only_from_an_output_that_ended(tmp_path):
    """A CoT-only base asked directly starts its chain of thought and is cut at 32 tokens; a letter found in its
    first words ("... row 1 column 1: no") must not score."""
    from latent_apps.eval.methods import Generation
    from latent_apps.eval.runner import _run_batch

    sample = {"id": "q", "question": "Is there a red circle?", "options": {"A": "yes", "B": "no"}, "answer": "A"}

    class Canned:
        complete_only = True

        def __init__(self, text: str, truncated: bool) -> None:
            self.text, self.truncated = text, truncated

        def __call__(self, model, processor, batch, max_new_tokens):
            return [Generation(text=self.text, generated_tokens=32, truncated=self.truncated)]

    for text, truncated, correct in [("<SUMMARY>I will look. A", True, False), ("A", False, True)]:
        path = tmp_path / "samples.jsonl"
        with open(path, "w") as f:
            _run_batch(None, None, Canned(text, truncated), [sample], 32, f)
        record = json.loads(path.read_text())
        assert record["correct"] is correct and record["unanswered"] is truncated, record


@pytest.mark.slow
def test_a_mixed_base_is_evaluated_both_ways(shapes, tmp_path, monkeypatch):
    from latent_core.collate import SupervisedCollator

    batches, collate = [], SupervisedCollator.__call__
    monkeypatch.setattr(SupervisedCollator, "__call__", lambda self, rows: batches.append([r["id"] for r in rows])
                        or collate(self, rows))  # fmt: skip
    out = tmp_path / "mixed"
    summary = make_base(
        "mllama", shapes, out, size="deep", steps=8, batch_size=4, threads=1, eval_samples=2, eval_batch_size=2,
        show_progress=False, mix="cot+direct+partial", group_by_length=True,
    )  # fmt: skip
    assert summary["mix"] == "cot+direct+partial" and summary["dims"]["layers"] == 8
    # Rows of similar length train together, so a direct row is rarely padded to a staged answer's length: HF's
    # sampler sorts mega-batches of 2 batches here (8 of the 32 rows), so at most one batch in two mixes the kinds;
    # random batches of 4 mix them 7 times in 8 on average.
    assert len(batches) >= 8 and summary["group_by_length"]
    mixed = sum(len({"#direct" in i for i in batch}) > 1 for batch in batches[:8])
    assert mixed <= 4, batches
    assert summary["train_rows"] == 3 * summary["train_questions"]
    assert summary["eval"]["method"] == "cot" and summary["eval_direct"]["method"] == "direct"
    assert summary["eval_partial"]["method"] == "partial"
    for form in ("direct", "partial"):
        assert summary[f"eval_{form}"]["n"] == 2 and "blank_accuracy" in summary[f"eval_{form}"]
        samples = (out / "eval" / form / "llava_cot" / "samples.jsonl").read_text().splitlines()
        assert len(samples) == 2
    readme = (out / "README.md").read_text()
    assert "Asked directly" in readme and "its staged-CoT answer, asked directly" in readme
    assert "Asked for short reasoning (2 test questions, `latent eval --method partial`" in readme


def _fresh_questions(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Questions on scenes no base was trained on (another seed), with their staged answers."""
    out = tmp_path / "fresh"
    make_shapes(10, 987, out, test_fraction=1.0)
    rows = [json.loads(line) for line in (out / "test" / "llava_cot.jsonl").read_text().splitlines()]
    return out, rows


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_base_answers_fresh_questions(name, tmp_path):
    """Each shipped base (data/base/<name>) answers questions on unseen scenes right, asked with the training
    prompt, and falls to the majority level with blank images (so it reads the image)."""
    from latent_apps.eval.runner import run_eval

    base = ROOT / "data" / "base" / name
    if not (base / "config.json").is_file():
        pytest.skip(f"{base} is not shipped in this checkout")
    torch.set_num_threads(1)
    shapes, rows = _fresh_questions(tmp_path)
    summary = run_eval(
        str(base), "cot", [shapes / "test" / "llava_cot.jsonl"], tmp_path / "eval", batch_size=40, max_new_tokens=400,
        blank=True, show_progress=False,
    )["benches"]["llava_cot"]  # fmt: skip
    assert summary["n"] == len(rows) == 40
    assert summary["n_truncated"] == 0 and summary["n_unanswered"] == 0
    assert summary["accuracy"] >= SHIPPED[name], summary["accuracy_per_category"]
    assert summary["blank"]["accuracy"] <= summary["majority_baseline"]["accuracy"] + 0.15
