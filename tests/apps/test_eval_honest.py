"""Honest evaluation: truncated outputs are flagged and counted, a staged output without a closed <CONCLUSION> is
unanswered (never guessed from its caption), the blank-image and majority controls, the LLaVA-CoT JSONL bench, and
the same prompt text in training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from latent_apps.eval.methods import CotMethod, Generation, PlainMethod, build_inputs, build_prompt_text
from latent_apps.eval.runner import majority_baseline, read_samples_jsonl, run_eval
from latent_apps.shapes import make_shapes
from latent_core.testing import tiny_model
from PIL import Image


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(12, 5, out, test_fraction=0.5)
    return out


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2_5_vl")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StagedScript:
    """A staged method with scripted outputs by position in the bench: a closed conclusion, an output cut in the
    caption (it names "row 1 column 2", which a lax extractor reads as an option), a closed conclusion that is wrong,
    and one cut after its conclusion (truncated, but answered)."""

    name = "staged-script"
    staged = True
    default_max_new_tokens = 7

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def __call__(self, model, processor, samples, max_new_tokens):
        out = []
        for sample in samples:
            i = len(self.seen)
            self.seen.append(sample)
            gold = sample["answer"]
            texts = [
                (f"<SUMMARY>s</SUMMARY><CAPTION>c</CAPTION><REASONING>r</REASONING><CONCLUSION>{gold}</CONCLUSION>", 0),
                ("<SUMMARY>s</SUMMARY><CAPTION>row 1 column 2: red circle. row 1 column", 1),
                ("<CONCLUSION>no such answer</CONCLUSION>", 0),
                (f"<CONCLUSION>{gold}</CONCLUSION> and then more text", 1),
            ]
            text, cut = texts[i % 4]
            out.append(Generation(text=text, generated_tokens=max_new_tokens if cut else 3, truncated=bool(cut)))
        return out


def test_truncated_and_unanswered_are_counted(shapes, qwen, tmp_path):
    model, processor = qwen
    method = StagedScript()
    bench = shapes / "test" / "llava_cot.jsonl"
    summary = run_eval(model, method, [bench], tmp_path, processor=processor, show_progress=False)
    assert summary["max_new_tokens"] == 7  # the method's default budget when none is given
    records = read_samples_jsonl(tmp_path / "llava_cot" / "samples.jsonl")
    assert len(records) == len(_jsonl(bench)) >= 8
    for i, r in enumerate(records):
        assert r["truncated"] == (i % 4 in (1, 3))
        assert r["unanswered"] == (i % 4 == 1)
        assert r["correct"] == (i % 4 in (0, 3))
        if i % 4 == 1:
            assert r["extracted"] is None  # never guessed from "column 2" in the caption
    b = summary["benches"]["llava_cot"]
    assert b["n_truncated"] == sum(i % 4 in (1, 3) for i in range(len(records)))
    assert b["n_unanswered"] == sum(i % 4 == 1 for i in range(len(records)))
    assert b["n_correct"] == sum(i % 4 in (0, 3) for i in range(len(records)))
    md = (tmp_path / "summary.md").read_text()
    assert "truncated" in md and "unanswered" in md and "majority %" in md


class _FixedGenerate:
    """Stands in for ``model.generate``: returns the prompt followed by fixed new tokens per row."""

    def __init__(self, model, new_tokens: list[list[int]]) -> None:
        self.model, self.new_tokens = model, new_tokens

    def __call__(self, input_ids, **kwargs):
        width = max(len(t) for t in self.new_tokens)
        pad = self.model.generation_config.pad_token_id or 0
        rows = [t + [pad] * (width - len(t)) for t in self.new_tokens]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


@pytest.mark.parametrize("method_class", [PlainMethod, CotMethod])
def test_methods_flag_a_generation_without_eos_as_truncated(qwen, method_class, monkeypatch):
    model, processor = qwen
    tok = processor.tokenizer
    eos = tok.eos_token_id
    words = tok("<CONCLUSION>yes</CONCLUSION>", add_special_tokens=False)["input_ids"]
    filler = tok("row 1 column 2", add_special_tokens=False)["input_ids"]
    budget = len(words) + 1
    new = [words + [eos], (filler * budget)[:budget]]  # ends with EOS; cut at the budget
    monkeypatch.setattr(model, "generate", _FixedGenerate(model, new))
    image = Image.new("RGB", (56, 56))
    samples = [{"id": str(i), "question": "Is there a red circle?", "image": image} for i in (0, 1)]
    first, second = method_class()(model, processor, samples, budget)
    assert (first.truncated, first.generated_tokens) == (False, len(words) + 1)
    assert (second.truncated, second.generated_tokens) == (True, budget)
    if method_class is CotMethod:
        assert first.reasoning_tokens == 0  # the conclusion starts at once
        assert second.reasoning_tokens == budget  # no conclusion: every token counts


class ImageSensitive:
    """Answers the gold answer when the image has any non-white pixel, else words that answer nothing; records the
    images it saw."""

    name = "image-sensitive"
    staged = False
    default_max_new_tokens = 4

    def __init__(self) -> None:
        self.images: list[Image.Image] = []

    def __call__(self, model, processor, samples, max_new_tokens):
        out = []
        for s in samples:
            self.images.append(s["image"])
            blank = s["image"].convert("L").getextrema() == (255, 255)
            out.append(Generation(text="nothing to see" if blank else str(s["answer"]), generated_tokens=1))
        return out


def test_blank_image_control_and_majority_baseline(shapes, qwen, tmp_path):
    model, processor = qwen
    method = ImageSensitive()
    bench = shapes / "test" / "llava_cot.jsonl"
    summary = run_eval(model, method, [bench], tmp_path, processor=processor, blank=True, show_progress=False)
    b = summary["benches"]["llava_cot"]
    n = b["n"]
    assert len(method.images) == 2 * n
    originals, blanks = method.images[:n], method.images[n:]
    assert all(img.convert("L").getextrema() != (255, 255) for img in originals)
    assert all(img.convert("L").getextrema() == (255, 255) for img in blanks)
    assert [img.size for img in blanks] == [img.size for img in originals]
    assert b["accuracy"] == 1.0
    assert b["blank"]["accuracy"] == 0.0 and b["blank"]["n"] == n
    assert (tmp_path / "llava_cot" / "blank" / "samples.jsonl").is_file()
    # the majority baseline, by hand: per category and answer form (letter / open), the share of its most common
    # gold answer
    records = read_samples_jsonl(tmp_path / "llava_cot" / "samples.jsonl")
    hits = 0
    for group in {(r["category"], r["kind"]) for r in records}:
        golds = [r["gold"].lower() for r in records if (r["category"], r["kind"]) == group]
        hits += max(golds.count(g) for g in set(golds))
    assert b["majority_baseline"]["accuracy"] == pytest.approx(hits / n)
    assert set(b["majority_baseline"]["per_category"]) == {"count", "exists", "colour", "compare"}


def test_majority_baseline_by_hand():
    records = [
        {"category": "a", "kind": "text", "gold": "x"},
        {"category": "a", "kind": "text", "gold": "x"},
        {"category": "a", "kind": "text", "gold": "y"},
        {"category": None, "kind": "yes_no", "gold": "Yes"},
        {"category": None, "kind": "yes_no", "gold": "no"},
        {"category": "a", "kind": "choice", "gold": "B"},  # the same category asked as multiple choice
        {"category": "a", "kind": "choice", "gold": "B"},
        {"category": "a", "kind": "choice", "gold": "A"},
    ]
    result = majority_baseline(records)
    assert result["accuracy"] == pytest.approx((2 + 1 + 2) / 8)
    assert result["per_category"]["a"] == {"n": 6, "answers": {"choice": "b", "text": "x"}, "accuracy": 4 / 6}
    assert result["per_category"]["yes_no"]["accuracy"] == 0.5


class Echo:
    """Records the samples it is given and answers with their gold conclusion."""

    name = "echo"
    staged = True
    default_max_new_tokens = 4

    def __init__(self) -> None:
        self.samples: list[dict] = []

    def __call__(self, model, processor, samples, max_new_tokens):
        self.samples += samples
        return [Generation(text=f"<CONCLUSION>{s['answer']}</CONCLUSION>", generated_tokens=2) for s in samples]


def test_llava_cot_jsonl_bench(shapes, qwen, tmp_path):
    """Every test question of the shapes LLaVA-CoT split is a sample: asked with its human turn verbatim, gold = its
    <CONCLUSION>, options parsed from the prompt, category = the question kind."""
    from latent_core.readers import parse_cot_stages

    model, processor = qwen
    method = Echo()
    bench = shapes / "test" / "llava_cot.jsonl"
    summary = run_eval(model, method, [bench], tmp_path, processor=processor, show_progress=False)
    rows = _jsonl(bench)
    assert summary["benches"]["llava_cot"]["n"] == len(rows) and summary["benches"]["llava_cot"]["accuracy"] == 1.0
    for row, sample in zip(rows, method.samples, strict=True):
        human, gpt = (turn["value"] for turn in row["conversations"])
        assert sample["id"] == row["id"]
        assert build_prompt_text(sample, None) == human.removeprefix("<image>\n")
        assert sample["answer"] == parse_cot_stages(gpt)["conclusion"]
        assert sample["category"] == row["id"].rsplit("-", 1)[1]
        if "Options:" in human:
            assert sample["options"] and sample["answer"] in sample["options"]
        assert sample["image"].size == Image.open(shapes / row["image"]).size


def test_training_and_evaluation_prompts_agree(shapes):
    """The tokens a base is trained on (the collator's prompt part) are the tokens evaluation feeds it, for the
    LLaVA-CoT bench and for the VLMEvalKit TSV (whose multiple-choice questions are rebuilt by the shared builder)."""
    from latent_apps.base import shapes_rows
    from latent_apps.eval.runner import _reader_for
    from latent_core.collate import SupervisedCollator

    model, processor = tiny_model("mllama")
    rows = {r["id"]: r for r in shapes_rows(shapes / "test" / "llava_cot.jsonl")}
    collator = SupervisedCollator(processor, image_root=shapes)
    jsonl, _ = _reader_for(shapes / "test" / "llava_cot.jsonl")(shapes / "test" / "llava_cot.jsonl")
    tsv, _ = _reader_for(shapes / "test" / "shapes_mc.tsv")(shapes / "test" / "shapes_mc.tsv")
    tsv = list(tsv)
    compared_mc = 0
    for i, sample in enumerate(jsonl):
        train = collator([rows[sample["id"]]])
        n_prompt = int((train["labels"][0] == -100).sum() - (train["attention_mask"][0] == 0).sum())
        evaluated, _ = build_inputs(model, processor, [sample], [build_prompt_text(sample, CotMethod.instruction)])
        assert torch.equal(evaluated["input_ids"][0], train["input_ids"][0, :n_prompt])
        if "Options:" in sample["prompt"]:  # the TSV row of the same question asks the same text
            assert build_prompt_text(tsv[i], CotMethod.instruction) == sample["prompt"]
            compared_mc += 1
    assert compared_mc > 0


class _LanguageModelInputs:
    """Records, at every prefill (more than one position), what the language model is given from the image: the
    ``inputs_embeds`` (image features scattered into the sequence) and mllama's ``cross_attention_states``, and the
    output of mllama's first cross-attention layer (where the image enters the text)."""

    def __init__(self, model) -> None:
        from latent_core.families import model_parts

        self.parts = model_parts(model)
        self.prefills: list[dict[str, torch.Tensor]] = []
        self.handles = [self.parts.language_model.register_forward_pre_hook(self._decoder, with_kwargs=True)]
        for i in self.parts.cross_attention_layers[:1]:
            self.handles.append(self.parts.decoder_layers[i].register_forward_hook(self._cross_layer))

    def _decoder(self, module, args, kwargs):
        embeds, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
        sequence = embeds if embeds is not None else ids
        if sequence is not None and sequence.shape[1] > 1:
            record = {"inputs_embeds": embeds.detach().clone()} if embeds is not None else {}
            if kwargs.get("cross_attention_states") is not None:
                record["cross_attention_states"] = kwargs["cross_attention_states"].detach().clone()
            self.prefills.append(record)

    def _cross_layer(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] > 1 and self.prefills:
            self.prefills[-1]["cross_attention_output"] = hidden.detach().clone()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _lavit_student(family: str):
    from latent_apps.eval.lavit_method import LavitMethod
    from latent_core.tokens import add_special_tokens

    model, processor = tiny_model(family)
    method = LavitMethod()
    method.latent_ids = add_special_tokens(model, processor, [f"<v-trace_{i}>" for i in range(1, 5)])
    return model, processor, method


def _lare_model(tmp_path: Path):
    from lare import LareConfig
    from lare.model import from_llava
    from latent_apps.eval.lare_method import LareMethod
    from latent_core.testing import save_tiny_model

    model, processor = from_llava(str(save_tiny_model("llava", tmp_path / "llava")), LareConfig(
        extractor_hidden=32, extractor_heads=4, window=2, num_latents=2))  # fmt: skip
    return model, processor, LareMethod()


@pytest.mark.parametrize(
    ("family", "method"),
    [(f, m) for f in ("mllama", "llava_next", "qwen2_5_vl", "llava") for m in ("cot", "heima")]  # cot: plain's path
    + [("qwen2_5_vl", "lavit"), ("llava", "lare")],
)
def test_a_blank_image_changes_what_the_language_model_sees(shapes, family, method, tmp_path):
    """The blank-image control must reach the model: in every family and eval method the language model gets other
    image inputs at prefill (mllama: other cross-attention states, and its cross-attention layer computes other
    states), not just other PIL images in the sample (issue: mllama's CoT scored the same with blank images)."""
    from latent_apps.eval.methods import get_method

    if method == "lavit":
        model, processor, method_obj = _lavit_student(family)
    elif method == "lare":
        model, processor, method_obj = _lare_model(tmp_path)
    else:
        (model, processor), method_obj = tiny_model(family), get_method(method)
    recorder = _LanguageModelInputs(model.vlm if method == "lare" else model.eval())
    try:
        bench = shapes / "test" / "llava_cot.jsonl"
        run_eval(model, method_obj, [bench], tmp_path / "eval", processor=processor, limit=2, batch_size=2,
                 max_new_tokens=2, blank=True, show_progress=False)  # fmt: skip
    finally:
        recorder.remove()
    assert len(recorder.prefills) % 2 == 0 and recorder.prefills  # the images pass, then the blank pass
    half = len(recorder.prefills) // 2
    image, blank = recorder.prefills[0], recorder.prefills[half]
    keys = ["cross_attention_states", "cross_attention_output"] if family == "mllama" else ["inputs_embeds"]
    for key in keys:
        assert key in image and key in blank, key
        assert image[key].shape == blank[key].shape
        assert not torch.allclose(image[key], blank[key]), key
