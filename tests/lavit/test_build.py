"""build-lavit-15k: the filters and their counts, kill-and-resume byte-identity, refusals, and the command on the
shapes task's Visual-CoT file with a shipped base as teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from latent_apps.shapes import make_shapes
from latent_core.shards import INDEX_NAME
from latent_core.testing import tiny_model
from lavit import build as build_module
from lavit.build import BuildConfig, BuildError, build, read_teacher_data
from lavit.filters import JudgeSettings, answers_match, normalize_answer
from lavit.teacher import TeacherOptions, TeacherOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(n=6, seed=0, out=out, test_fraction=0.5)
    return out


def test_answer_normalisation():
    assert normalize_answer("The answer is: Two!") == "2"
    assert normalize_answer("(B)") == "b" and normalize_answer("b.") == "b"
    assert answers_match("Yes, there is one.", "yes") and answers_match("2 red circles", "two")
    assert not answers_match("no", "not sure") and not answers_match("blue", "B") and answers_match("B. blue", "B")
    assert not answers_match("", "yes")


# ------------------------------------------------------------------------------------------------- the filters


class _Choice:
    def __init__(self, content):
        self.message = type("M", (), {"content": content})


class _FailingClient:
    """An OpenAI-like client whose every call fails (an endpoint that is down)."""

    calls = 0

    class chat:  # noqa: N801
        class completions:  # noqa: N801
            @staticmethod
            def create(**kwargs):
                _FailingClient.calls += 1
                raise ConnectionError("endpoint down")


def _fake_rows(shapes):
    rows = [json.loads(line) for line in (shapes / "train" / "visual_cot.jsonl").read_text().splitlines()[:5]]
    path = shapes / "fixture.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows, path


def test_each_filter_is_counted_and_a_failing_judge_is_an_error(shapes, tmp_path, monkeypatch):
    # A scripted teacher: each row's answer, text-only answer and attention map decide one filter.
    rows, path = _fake_rows(shapes)
    plan = {
        rows[0]["id"]: ("wrong", None, "inside"),  # incorrect (and the judge is down: an error, not a drop)
        rows[1]["id"]: ("right", "right", "inside"),  # answerable without the image
        rows[2]["id"]: ("right", "wrong", "outside"),  # misaligned
        rows[3]["id"]: ("right", "wrong", "inside"),  # kept
        rows[4]["id"]: ("right", "wrong", "inside"),  # kept
    }
    by_question = {row["question"]: row for row in rows}

    def fake_pass(model, processor, images, questions, options, system=None):
        outs = []
        for question in questions:
            row = by_question[question]
            kind, _, where = plan[row["id"]]
            answer = row["answer"] if kind == "right" else "certainly not " + row["answer"]
            # 3 x 3 merged grid over a 96 px image: put the mass on the bbox's cells, or on the others.
            x0, y0, x1, y1 = row["bbox"]
            inside = torch.tensor(
                [[x0 <= 32 * c + 16 < x1 and y0 <= 32 * r + 16 < y1 for c in range(3)] for r in range(3)]
            )
            scores = (inside if where == "inside" else ~inside).float().flatten() + 0.01 * torch.arange(9)
            outs.append(TeacherOutput(answer, [1, 2], False, scores, 2, torch.ones(9, 4), (1, 3, 3), cell_px=28))
        return outs

    def fake_text(model, processor, questions, max_new_tokens, system=None):
        return [by_question[q]["answer"] if plan[by_question[q]["id"]][1] == "right" else "pass" for q in questions]

    monkeypatch.setattr(build_module, "teacher_pass", fake_pass)
    monkeypatch.setattr(build_module, "_text_answers", fake_text)
    config = BuildConfig(
        data=str(path), images=str(shapes), out=str(tmp_path / "out"), teacher="scripted", batch_size=2,
        judge=JudgeSettings(model="judge", retries=1, backoff=0.0), overlays=1,
    )  # fmt: skip
    manifest = build(config, None, None, judge_client=_FailingClient)
    counts = manifest["counts"]
    assert counts["kept"] == 2 and counts["samples"] == 5
    assert counts["rejected"] == {"incorrect": 0, "answerable_without_image": 1, "misaligned": 1}
    assert counts["errors"] == {"judge": 1} and _FailingClient.calls == 2  # retried once, then an error
    lines = {line["id"]: line for line in map(json.loads, (tmp_path / "out" / INDEX_NAME).read_text().splitlines())}
    assert lines[rows[0]["id"]]["reason"] == "judge_error" and lines[rows[0]["id"]]["correct"] is None
    assert lines[rows[2]["id"]]["alignment"] < 0.2 <= lines[rows[3]["id"]]["alignment"]
    assert lines[rows[3]["id"]]["keys"] is not None and lines[rows[1]["id"]]["keys"] is None
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["samples"] == 2 and stats["per_source"] == {"shapes": 2}
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 2
    # Without a judge the wrong answer is simply incorrect; without V_sem tokens only their mean is stored.
    config.judge, config.out, config.vsem_tokens = None, str(tmp_path / "plain"), False
    assert build(config, None, None)["counts"]["rejected"]["incorrect"] == 1
    kept = list(read_teacher_data(tmp_path / "plain"))
    assert len(kept) == 2 and all(s["vsem_tokens"] is None and s["vsem_mean"].shape == (4,) for s in kept)


# ------------------------------------------------------------------------------------------ resume, refusals


def _config(shapes, out, **kw):
    options = TeacherOptions(max_new_tokens=4)
    return BuildConfig(
        data=str(shapes / "test" / "visual_cot.jsonl"), images=str(shapes), out=str(out), teacher="tiny",
        options=options, batch_size=3, keep_rejected=True, overlays=0, **kw,
    )  # fmt: skip


class _Killed(Exception):
    pass


def test_kill_and_resume_gives_identical_bytes(shapes, tmp_path):
    model, processor = tiny_model("qwen2_5_vl")
    model.eval()
    build(_config(shapes, tmp_path / "full"), model, processor)

    def kill_after_first(j, counts, remaining):
        if j >= 0:
            raise _Killed

    with pytest.raises(_Killed):
        build(_config(shapes, tmp_path / "killed"), model, processor, on_batch=kill_after_first)
    # What a kill -9 during the next batch leaves: a half-written shard and a torn index line.
    (tmp_path / "killed" / "shard-00001.safetensors.tmp").write_bytes(b"partial")
    with open(tmp_path / "killed" / INDEX_NAME, "a") as handle:
        handle.write('{"id": "torn')
    build(_config(shapes, tmp_path / "killed"), model, processor)
    full = sorted(p.name for p in (tmp_path / "full").glob("shard-*.safetensors"))
    assert full == sorted(p.name for p in (tmp_path / "killed").glob("shard-*.safetensors")) and len(full) >= 2
    for name in [*full, INDEX_NAME, "stats.json"]:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    lines = (tmp_path / "full" / INDEX_NAME).read_text().splitlines()
    assert len({json.loads(line)["id"] for line in lines}) == len(lines) > 0  # no duplicates
    # Every sample's signals read back, its image's V_sem resolved from whichever shard holds it.
    samples = list(read_teacher_data(tmp_path / "full", kept_only=False))
    assert len(samples) == len(lines) and len({s["image"] for s in samples}) < len(samples)  # images are shared
    for sample in samples:
        assert sample["traj_dense"].shape == (sample["image_tokens"],) and sample["traj_topk_indices"].numel() == min(
            8, sample["image_tokens"]
        )
        assert sample["vsem_tokens"].shape[0] == sample["image_tokens"]
        torch.testing.assert_close(sample["vsem_mean"], sample["vsem_tokens"].float().mean(0), atol=1e-2, rtol=0)

    with pytest.raises(BuildError, match="other settings.*min_alignment"):
        build(_config(shapes, tmp_path / "full", min_alignment=0.5), model, processor)


@pytest.mark.slow
def test_two_process_torchrun_build_gives_the_records_of_one_process(shapes, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    model, processor = tiny_model("qwen2_5_vl")
    one = _config(shapes, tmp_path / "one")
    build(one, model.eval(), processor)
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).with_name("build_worker.py")), one.data, one.images, str(two)]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (two / "parts" / "rank-001" / INDEX_NAME).is_file()

    def records(root):
        out = []
        for line in map(json.loads, (root / INDEX_NAME).read_text().splitlines()):
            shard = load_file(str(root / line.pop("file")))
            tensors = {k: shard[v] for k, v in (line["keys"] or {}).items() if v in shard}
            line.pop("vsem_key")  # which line stores an image's V_sem depends on how batches are shared
            out.append((line, tensors))
        return out

    got, want = records(two), records(tmp_path / "one")
    assert [line for line, _ in got] == [line for line, _ in want] and len(want) > 3
    for (_, a), (_, b) in zip(got, want, strict=True):
        for key in b.keys() & a.keys():
            assert torch.equal(a[key], b[key]), key
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == len(want)


def test_command_on_the_shapes_task_with_a_shipped_base(shapes, tmp_path):
    from latent_apps.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "lavit15k"
    args = ["build-lavit-15k", "--teacher", str(REPO / "data" / "base" / "qwen2_5_vl"),
            "--data", str(shapes / "test" / "visual_cot.jsonl"), "--images", str(shapes), "--out", str(out),
            "--limit", "4", "--batch-size", "2", "--max-new-tokens", "8", "--overlays", "1"]  # fmt: skip
    own = ["--min-pixels", "0", "--max-pixels", "0", "--system-prompt", ""]  # what the shapes base was trained on
    result = CliRunner().invoke(app, [*args, *own])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 4 and manifest["settings"]["options"]["queries"] == "answer"
    assert manifest["inputs"] == {"system_prompt": None, "min_pixels": 7056, "max_pixels": 7056}  # its processor's
    # A teacher without a Qwen2.5-VL merged patch grid (a LLaVA) is refused in one line, before it loads.
    llava = CliRunner().invoke(app, [*args[:2], str(REPO / "data" / "base" / "llava"), *args[3:8], str(tmp_path / "x")])
    assert llava.exit_code == 2 and llava.output.startswith("error:") and len(llava.output.strip().splitlines()) == 1
    assert "qwen2_5_vl" in llava.output and "llava" in llava.output
    assert (out / "stats.md").is_file() and len((out / INDEX_NAME).read_text().splitlines()) == 4
    again = CliRunner().invoke(app, [*args[:-2], "--overlays", "2", *own])
    assert again.exit_code == 0  # overlays only change the pictures, not the data: not a setting
    other = CliRunner().invoke(app, [*args, *own, "--top-k", "4"])
    assert other.exit_code == 2 and other.output.startswith("error:") and "options" in other.output
    # The difficulty filter with a named text model (the shipped text base) instead of the teacher without image.
    # Long enough answers that the base gets some right, so the filter runs on them.
    text_args = [*args[:8], str(tmp_path / "with-text"), *args[9:13], "--max-new-tokens", "300",
                 "--text-model", str(REPO / "data/base/causal_lm"), *own]  # fmt: skip
    result = CliRunner().invoke(app, text_args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "with-text" / INDEX_NAME).read_text().splitlines()]
    assert any(line["correct"] for line in lines)
    assert all((line["text_answer"] is not None) == bool(line["correct"]) for line in lines)
