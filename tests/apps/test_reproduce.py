"""`latent reproduce heima` in a reduced form (a few steps, a handful of samples): it runs end to end from a made
base and writes every file; the numbers are checked against the records it wrote. The thresholds of the paper's
claim belong to the full run (README), not to this test."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from latent_apps.base import make_base
from latent_apps.reproduce.heima import HeimaRun, direct_rows, reproduce_heima
from latent_apps.shapes import make_shapes


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    shapes = root / "shapes"
    make_shapes(8, 2, shapes, test_fraction=0.25)
    out = {"shapes": shapes}
    for family in ("mllama", "causal_lm"):
        out[family] = root / family
        make_base(family, shapes, out[family], steps=3, batch_size=4, threads=1, eval_samples=0, show_progress=False,
                  vision_warmup_steps=2, vision_freeze_steps=1)  # fmt: skip
    return out


@pytest.mark.slow
def test_reduced_reproduction_writes_every_file(bases, tmp_path):
    out = tmp_path / "run"
    run = HeimaRun(
        family="mllama", out=out, base=bases["mllama"], interpreter_base=bases["causal_lm"], stage_steps=2,
        recover_steps=1, batch_size=4, eval_samples=4, eval_batch_size=4, max_new_tokens=24, capture_records=8,
        interpreter_steps=2, interpreter_batch_size=4, decode_samples=4, decode_max_new_tokens=8, threads=1,
        show_progress=False,
    )  # fmt: skip
    results = reproduce_heima(run, command="test")
    for name in ("results.json", "results.md", "accuracy_vs_tokens.png", "shapes/summary.json", "model/config.json"):
        assert (out / name).is_file(), name
    for stage in ("stage-0", "stage-1", "stage-2", "stage-3", "recover", "one-shot", "one-shot-recover"):
        assert (out / "heima" / stage / "adapter_model.safetensors").is_file(), stage
        assert results["stages"][stage]["steps"] == (1 if "recover" in stage else 6 if stage == "one-shot" else 2)
    assert (out / "direct" / "model" / "config.json").is_file() and results["stages"]["direct"]["steps"] == 6
    for stage in ("summary", "caption", "reasoning"):
        assert (out / "interpreters" / stage / "adapter_model.safetensors").is_file()
    # the shapes data were regenerated from the base's make_base.json: the same bytes as the base's own
    assert (out / "shapes" / "test" / "llava_cot.jsonl").read_bytes() == (
        bases["shapes"] / "test" / "llava_cot.jsonl"
    ).read_bytes()

    on_disk = json.loads((out / "results.json").read_text())
    record = on_disk["record"]
    assert set(record) >= {
        "cot_accuracy", "heima_accuracy", "cot_generated_tokens", "heima_generated_tokens", "oneshot_accuracy",
        "caption_rougeL_gap_shuffled", "reasoning_rougeL_gap_shuffled", "wall_s", "direct_accuracy",
    }  # fmt: skip
    # every number comes from the per-sample records the evaluation wrote
    runs = {
        "cot (base)": "cot",
        "recover": "recover",
        "one-shot-recover": "one-shot-recover",
        "direct (no CoT)": "direct",
    }
    for label, directory in runs.items():
        samples = [json.loads(line) for line in (out / "eval" / directory / "llava_cot" / "samples.jsonl").open()]
        assert len(samples) == 4
        assert on_disk["eval"][label]["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 4)
        assert on_disk["eval"][label]["generated_tokens"] == pytest.approx(
            sum(s["generated_tokens"] for s in samples) / 4
        )
    assert record["cot_accuracy"] == on_disk["eval"]["cot (base)"]["accuracy"]
    assert record["heima_accuracy"] == on_disk["eval"]["recover"]["accuracy"]
    scores = json.loads((out / "scores" / "scores.json").read_text())
    gap = scores["gap"]["caption"]["shuffled"]["rouge"]
    assert record["caption_rougeL_gap_shuffled"] == pytest.approx(gap / 100)
    assert "blank_accuracy" in on_disk["eval"]["cot (base)"] and "blank_accuracy" in on_disk["eval"]["recover"]

    # a re-run reuses every finished stage, evaluation and capture
    again = reproduce_heima(run, command="test")
    assert again["eval"] == results["eval"]
    assert not results["resumed"] and again["resumed"] and "resumed" in (out / "results.md").read_text()
    assert again["record"]["wall_s"] < results["record"]["wall_s"]
    # other settings with the same --out are refused, never mixed with the finished stages
    from latent_core.cli import UserError

    with pytest.raises(UserError, match="other settings"):
        reproduce_heima(dataclasses.replace(run, stage_steps=3), command="test")


def test_direct_rows_keep_only_the_conclusion():
    row = {
        "id": "a",
        "prompt": "How many?",
        "image": "x.png",
        "answer": "<SUMMARY>s</SUMMARY>\n\n<CAPTION>c</CAPTION>\n\n<REASONING>r</REASONING>\n\n"
        "<CONCLUSION> B </CONCLUSION>",
    }
    assert direct_rows([row]) == [
        {"id": "a", "prompt": "How many?", "image": "x.png", "answer": "<CONCLUSION>B</CONCLUSION>"}
    ]


@pytest.mark.slow
def test_reduced_lavit_reproduction(tmp_path):
    """`latent reproduce lavit` end to end from a made Qwen2.5-VL base (teacher and student alike here), on teacher
    data built from it (every sample stored and marked kept: a 3-step teacher keeps none); the record's numbers
    are those of the evaluation and analysis files it wrote; a re-run reuses everything."""
    from latent_apps.reproduce.lavit import LavitRun, reproduce_lavit
    from latent_core.inference import load_trained
    from lavit.build import BuildConfig, build
    from lavit.inputs import InputSettings
    from lavit.teacher import TeacherOptions

    shapes = tmp_path / "shapes"
    make_shapes(8, 2, shapes, test_fraction=0.25)
    base = tmp_path / "base"
    make_base("qwen2_5_vl", shapes, base, steps=3, batch_size=4, threads=1, eval_samples=0, show_progress=False,
              vision_warmup_steps=2, vision_freeze_steps=1)  # fmt: skip
    data = tmp_path / "teacher-data"
    config = BuildConfig(
        data=str(shapes / "train" / "visual_cot.jsonl"), images=str(shapes), out=str(data), teacher=str(base),
        options=TeacherOptions(max_new_tokens=4), batch_size=8, limit=8, keep_rejected=True, overlays=0,
        inputs=InputSettings.own(),  # as the reproduction builds (the base's own inputs)
    )  # fmt: skip
    build(config, *load_trained(str(base)))
    index = data / "index.jsonl"
    index.write_text(
        "".join(json.dumps({**json.loads(x), "kept": True}) + "\n" for x in index.read_text().splitlines())
    )
    out = tmp_path / "run"
    run = LavitRun(
        out=out, teacher=base, student=base, shapes=shapes, teacher_data=data, steps=2, gate_warmup=1, batch_size=4,
        num_latents=2, ablations=(), eval_samples=4, eval_batch_size=4, analysis_samples=2,
        analysis_max_new_tokens=4, show_progress=False,
    )  # fmt: skip
    results = reproduce_lavit(run, command="test")
    record = results["record"]
    assert set(record) >= {
        "naive_accuracy", "lavit_accuracy", "masked_latents_accuracy", "student_teacher_kl_naive",
        "student_teacher_kl_lavit", "entropy_base", "entropy_teacher", "entropy_lavit", "wall_s",
    }  # fmt: skip
    for label, directory in (
        ("naive SFT", "naive-sft"),
        ("LaViT", "lavit"),
        ("LaViT, latents masked", "lavit-latents-masked"),
    ):
        samples = [json.loads(x) for x in (out / "eval" / directory / "shapes_mc" / "samples.jsonl").open()]
        assert len(samples) == 4
        assert results["eval"][label]["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 4)
    assert record["masked_latents_accuracy"] == results["eval"]["LaViT, latents masked"]["accuracy"]
    rows = [json.loads(x) for x in (out / "analysis" / "samples.jsonl").open()]
    lavit_kl = [r["kl_to_teacher"] for r in rows if r["model"] == "LaViT"]
    assert record["student_teacher_kl_lavit"] == pytest.approx(sum(lavit_kl) / len(lavit_kl))
    assert (out / "results.md").is_file() and (
        out / "train" / "lavit" / "student" / "stage_weights.safetensors"
    ).is_file()
    again = reproduce_lavit(run, command="test")
    assert again["eval"] == results["eval"] and again["record"]["wall_s"] < record["wall_s"]
    # other settings with the same --out are refused, never mixed with the old results
    from latent_core.cli import UserError

    with pytest.raises(UserError, match="other settings"):
        reproduce_lavit(dataclasses.replace(run, steps=3), command="test")


@pytest.mark.slow
def test_reduced_lare_reproduction(tmp_path):
    """`latent reproduce lare` end to end from a made llava base (the control, LaRe with L_img through a VAE made
    here, the w/o-extractor ablation; 2 jobs): the record's numbers are those of the evaluation and probe files it
    wrote; the no-latent control ran stages I and III only and answers with no latent step; a re-run reuses
    everything; other settings are refused."""
    from latent_apps.reproduce.lare import LareRun, reproduce_lare
    from latent_core.cli import UserError

    shapes = tmp_path / "shapes"
    make_shapes(8, 2, shapes, test_fraction=0.25)
    base = tmp_path / "base"
    make_base("llava", shapes, base, steps=2, batch_size=4, threads=1, eval_samples=0, show_progress=False,
              vision_warmup_steps=1, vision_freeze_steps=1)  # fmt: skip
    out = tmp_path / "run"
    run = LareRun(
        out=out, base=base, shapes=shapes, stage_steps=(1, 1, 2), batch_size=4, num_latents=2, extractor_hidden=16,
        extractor_heads=2, vae_steps=2, vae_width=8, crop_size=64, ablations=("no-extractor",), jobs=2,
        eval_samples=4, eval_batch_size=4, cot_max_new_tokens=4, halting=("cos:0.5",), probe_samples=8,
        probe_seeds=1, show_progress=False,
    )  # fmt: skip
    results = reproduce_lare(run, command="test")
    record = results["record"]
    assert set(record) >= {
        "cot_accuracy", "lare_accuracy", "cot_tokens_correct", "lare_tokens_correct", "no_extractor_accuracy",
        "probe_accuracy_lare", "probe_accuracy_no_extractor", "sft_accuracy", "wall_s",
    }  # fmt: skip
    assert record["no_alignment_accuracy"] is None  # not trained here (--ablations)
    for label, directory, bench in (
        ("CoT (the base)", "cot", "llava_cot"),
        ("LaRe", "lare", "shapes_mc"),
        ("w/o extractor", "no-extractor", "shapes_mc"),
        ("LaRe, halting cos < 0.5", "lare-halting-cos-lt-0.5", "shapes_mc"),
        ("no-latent SFT", "no-latent-sft", "shapes_mc"),
    ):
        samples = [json.loads(x) for x in (out / "eval" / directory / bench / "samples.jsonl").open()]
        assert len(samples) == 4
        assert results["eval"][label]["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 4)
        if label == "no-latent SFT":
            assert {s["latent_steps"] for s in samples} == {0}
    sft = out / "train" / "no-latent-sft" / "run"
    assert (sft / "stage-3" / "lare_train.json").is_file() and not (sft / "stage-2").exists()
    for variant, stages in (("no-latent-sft", (1, 3)), ("lare", (1, 2, 3)), ("no-extractor", (1, 2, 3))):
        for stage in stages:  # each stage ran its own step count
            summary = json.loads((out / "train" / variant / "run" / f"stage-{stage}" / "lare_train.json").read_text())
            assert summary["steps"] == run.stage_steps[stage - 1]
    halted = [json.loads(x) for x in (out / "eval" / "lare-halting-cos-lt-0.5" / "shapes_mc" / "samples.jsonl").open()]
    assert all(1 <= s["latent_steps"] <= 2 for s in halted)
    assert record["halting_cos_0.5_steps"] == pytest.approx(sum(s["latent_steps"] for s in halted) / 4)
    lare_rows = [json.loads(x) for x in (out / "eval" / "lare" / "shapes_mc" / "samples.jsonl").open()]
    right = [s for s in lare_rows if s["correct"]]
    if right:  # <bot>, the T latent steps, <eot> and the generated answer tokens
        assert record["lare_tokens_correct"] == pytest.approx(
            sum(s["generated_tokens"] for s in right) / len(right) + 2 + 2
        )
    assert (out / "train" / "lare" / "run" / "stage-3" / "lare_reconstructor.safetensors").is_file()
    for name, directory in (("lare", "lare"), ("no_extractor", "no-extractor")):
        probe = json.loads((out / "probe" / directory / "probe.json").read_text())
        assert record[f"probe_accuracy_{name}"] == probe["text"]["svm_accuracy"]
    assert record["lare_accuracy"] == results["eval"]["LaRe"]["accuracy"]
    assert (out / "results.md").is_file()
    again = reproduce_lare(run, command="test")
    assert again["eval"] == results["eval"] and again["record"]["wall_s"] < record["wall_s"]
    with pytest.raises(UserError, match="other settings"):
        reproduce_lare(dataclasses.replace(run, stage_steps=(1, 1, 3)), command="test")
    # a variant killed part-way is refused too, never finished with other settings
    import shutil

    for variant in ("no-latent-sft", "lare", "no-extractor"):
        shutil.rmtree(out / "train" / variant / "run" / "stage-3")
    with pytest.raises(UserError, match="other settings"):
        reproduce_lare(dataclasses.replace(run, learning_rate=5e-2), command="test")


def test_reduced_coconut_reproduction(tmp_path):
    """`latent reproduce coconut` end to end from a made mixed base on hop questions (2 seeds): every row's numbers
    are those of the samples it wrote, the hop 2-3 accuracy is the count-weighted mean of its kinds, the seed
    summary is the mean of the seeds' rows; a re-run reuses everything; other settings are refused."""
    import statistics

    from latent_apps.reproduce.coconut import CoconutRun, reproduce_coconut
    from latent_core.cli import UserError

    shapes = tmp_path / "shapes"
    make_shapes(8, 2, shapes, test_fraction=0.25, hops=(1, 2, 3))
    base = tmp_path / "base"
    make_base("mllama", shapes, base, steps=2, batch_size=4, threads=1, eval_samples=0, show_progress=False,
              vision_warmup_steps=1, vision_freeze_steps=1, mix="cot+direct")  # fmt: skip
    out = tmp_path / "run"
    run = CoconutRun(out=out, base=base, shapes=shapes, steps_per_stage=1, c_thought=1, max_latent_stage=2,
                     batch_size=4, seeds=(0, 1), eval_samples=6, eval_batch_size=6, cot_max_new_tokens=4,
                     show_progress=False)  # fmt: skip
    results = reproduce_coconut(run, command="test")
    for label, directory in (("CoT (the base)", "cot"), ("direct (the base)", "direct"),
                             ("Coconut, seed 0", "coconut-seed-0"), ("Coconut, seed 1", "coconut-seed-1")):  # fmt: skip
        samples = [json.loads(x) for x in (out / "eval" / directory / "llava_cot" / "samples.jsonl").open()]
        row = results["eval"][label]
        assert len(samples) == 6 and row["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 6)
        hard = [s for s in samples if s["category"] in ("hop2", "hop3")]
        if hard:
            assert row["hop23_accuracy"] == pytest.approx(sum(s["correct"] for s in hard) / len(hard))
        if directory.startswith("coconut"):
            assert {s["latent_steps"] for s in samples} == {2} and all("zero" in s["controls"] for s in samples)
    seeds = [results["eval"][f"Coconut, seed {s}"]["accuracy"] for s in (0, 1)]
    assert results["record"]["coconut_accuracy"] == pytest.approx(statistics.fmean(seeds))
    assert results["coconut"]["accuracy"]["std"] == pytest.approx(statistics.pstdev(seeds))
    assert (out / "results.md").is_file() and (out / "accuracy_vs_hops.png").stat().st_size > 0
    again = reproduce_coconut(run, command="test")
    assert again["eval"] == results["eval"]
    with pytest.raises(UserError, match="other settings"):
        reproduce_coconut(dataclasses.replace(run, learning_rate=5e-2), command="test")

    # --kinds: trained and evaluated on those question kinds only; --eval-stages: the first seed's stage 1 too
    test = [json.loads(x) for x in (shapes / "test" / "llava_cot.jsonl").open()]
    want = sorted(r["id"] for r in test if r["category"] in ("count", "colour"))
    some = dataclasses.replace(run, out=tmp_path / "kinds", seeds=(0,), kinds=("count", "colour"), eval_stages=(1,),
                               eval_samples=len(test))  # fmt: skip
    results = reproduce_coconut(some, command="test")
    assert set(results["eval"]) == {"CoT (the base)", "direct (the base)", "Coconut, seed 0", "Coconut stage 1, seed 0"}
    for directory, steps in (("coconut-seed-0", 2), ("coconut-stage-1-seed-0", 1)):
        samples = [json.loads(x) for x in (some.out / "eval" / directory / "llava_cot" / "samples.jsonl").open()]
        assert sorted(s["id"] for s in samples) == want and {s["latent_steps"] for s in samples} == {steps}
    assert results["coconut"]["accuracy"]["n"] == 1  # the stage row is not a seed
    assert "carried_count" in results["eval"]["Coconut stage 1, seed 0"]
    settings = json.loads((some.out / "train" / "seed-0" / "reproduce_settings.json").read_text())
    assert settings["kinds"] == ["count", "colour"]
    with pytest.raises(UserError, match="hop7"):
        reproduce_coconut(dataclasses.replace(some, kinds=("hop7",)), command="test")
    with pytest.raises(UserError, match="eval-stages 2"):
        reproduce_coconut(dataclasses.replace(some, eval_stages=(2,)), command="test")


def test_carried_counts_against_a_hand_count():
    """`carried_counts` on hand-written stage outputs: the first running count after the thoughts is checked against
    the gold scan at that cell, the majority is that cell's most common gold value, a wrong later verdict and an
    output without cells are counted, colour questions are left out."""
    from latent_apps.reproduce.coconut import carried_counts

    def scan(*cells: tuple[int, str, int]) -> str:
        return " ".join(f"row 1 column {c}: red circle vs red circle, {v}, {t}." for c, v, t in cells)

    staged = {
        "a": scan((1, "yes", 1), (2, "no", 1), (3, "yes", 2)),
        "b": scan((1, "no", 0), (2, "no", 0), (3, "no", 0)),
        "c": scan((1, "no", 0), (2, "no", 0), (3, "yes", 1)),
        "d": scan((1, "yes", 1)),
        "e": "row 1 column 1: x",
    }
    samples = [
        {"id": "a", "category": "count", "prediction": scan((2, "no", 1), (3, "yes", 2))},  # carried 1: right
        {"id": "b", "category": "exists", "prediction": scan((2, "no", 1), (3, "no", 1))},  # carried 1, gold 0
        {"id": "c", "category": "count", "prediction": scan((2, "no", 0), (3, "no", 0))},  # right, verdict wrong
        {"id": "d", "category": "count", "prediction": "So the count is 1."},  # no cell written
        {"id": "e", "category": "colour", "prediction": scan((2, "no", 5))},  # not a counting scan: left out
    ]
    got = carried_counts(samples, staged)
    # column 2's gold running counts: 1, 0, 0 -> the most common value (0) is right for 2 of 3
    assert got == {"n": 3, "right": pytest.approx(2 / 3), "majority": pytest.approx(2 / 3),
                   "verdicts_right": pytest.approx(2 / 3), "no_cell": 1}  # fmt: skip
    assert carried_counts(samples[4:], staged) is None
