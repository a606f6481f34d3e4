"""The LaViT student's forward against an eager reference: the recorded latent rows and L_traj equal a hand
computation from eager attention (output_attentions) over the same sequence, in both latent modes and under
activation checkpointing; L_traj is non-zero with gradients into the attention projections; the gate leaves the
latent and prompt rows alone."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from latent_core.families import image_token_mask, model_parts
from latent_core.prompts import encode_chats, render_prompts
from latent_core.testing import tiny_image, tiny_model
from latent_core.tokens import add_special_tokens
from lavit.config import latent_tokens
from lavit.model import LavitStudent

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUESTIONS = ["How many red circles are there?", "Is there a small yellow star?"]
K = 3


def _student(mode: str, seed: int = 0):
    model, processor = tiny_model("qwen2_5_vl", seed=seed)
    ids = add_special_tokens(model, processor, latent_tokens(K))
    torch.manual_seed(seed + 1)
    return LavitStudent(model, ids, teacher_hidden=12, mode=mode), processor


def _batch(processor):
    chats = render_prompts(processor, QUESTIONS, [1, 1])
    images = [[tiny_image(0, size=84)], [tiny_image(1, size=84)]]
    prompt = dict(encode_chats(processor, chats, images, padding_side="left"))
    answer = torch.tensor([[11, 12, 13], [14, 15, 0]])
    labels = answer.clone()
    labels[1, -1] = -100
    return prompt, answer, labels


def _targets(prompt, student):
    n = int(image_token_mask(student.backbone, prompt["input_ids"])[0].sum())
    grids = [(int(h) // 2, int(w) // 2) for _, h, w in prompt["image_grid_thw"].tolist()]
    torch.manual_seed(3)
    targets = [torch.softmax(torch.randn(n), 0) for _ in grids]
    return targets, grids


def _eager_rows(student, prompt, answer, latents):
    """Each sample alone (no padding), the whole sequence in one eager forward with output_attentions: the latent
    positions' rows over the image keys, mean over heads and layers. Continuous mode: the latent positions after the
    first take the loop's latents as input embeddings."""
    eager = copy.deepcopy(student.backbone)
    eager.set_attn_implementation("eager")
    parts = model_parts(eager)
    rows = []
    for b in range(answer.shape[0]):
        real = prompt["attention_mask"][b].bool()
        ids = torch.cat([prompt["input_ids"][b][real], torch.tensor(student.latent_ids), answer[b]])[None]
        types = torch.cat([prompt["mm_token_type_ids"][b][real], torch.zeros(K + answer.shape[1], dtype=torch.long)])
        full = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": types[None],
            "pixel_values": prompt["pixel_values"][_pixel_slice(prompt, b)],
            "image_grid_thw": prompt["image_grid_thw"][b : b + 1],
        }
        captured: dict = {}

        def grab(module, args, kwargs, captured=captured):
            captured.update(kwargs)

        hook = parts.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            eager(**full)
        hook.remove()
        embeds = captured["inputs_embeds"].clone()
        start = int(real.sum())
        if latents is not None:
            embeds[0, start + 1 : start + K] = latents[b].detach()
        with torch.no_grad():
            out = parts.language_model(
                inputs_embeds=embeds, position_ids=captured["position_ids"], output_attentions=True, use_cache=False
            )
        image = image_token_mask(eager, ids)[0]
        att = torch.stack(out.attentions)[:, 0].mean((0, 1))  # [S, S]
        rows.append(att[start : start + K][:, image])
    return rows


def _built_teacher_data(tmp_path, scenes):
    """A shapes task and a build-lavit-15k output of it in ``tmp_path / "data"`` (a random tiny teacher; every sample
    stored with keep_rejected and marked kept, since that teacher keeps none); returns the shapes dir and the lines."""
    from latent_apps.shapes import make_shapes
    from lavit.build import BuildConfig, build
    from lavit.teacher import TeacherOptions

    shapes = tmp_path / "shapes"
    make_shapes(n=scenes, seed=0, out=shapes, test_fraction=0.5)
    teacher, teacher_processor = tiny_model("qwen2_5_vl", seed=5)
    config = BuildConfig(
        data=str(shapes / "train" / "visual_cot.jsonl"), images=str(shapes), out=str(tmp_path / "data"),
        teacher="tiny", options=TeacherOptions(max_new_tokens=2), batch_size=4, keep_rejected=True, overlays=0,
    )  # fmt: skip
    build(config, teacher.eval(), teacher_processor)
    index = tmp_path / "data" / "index.jsonl"
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    index.write_text("".join(json.dumps({**line, "kept": True}) + "\n" for line in lines))
    return shapes, lines


def _pixel_slice(prompt, b):
    sizes = (prompt["image_grid_thw"].prod(-1)).tolist()
    start = sum(sizes[:b])
    return slice(start, start + sizes[b])


def _hand_traj(target, rows):
    total = 0.0
    for row in rows:
        q = row / row.sum()
        total += sum(float(p) * math.log(float(p) / float(qq)) for p, qq in zip(target, q, strict=True) if p > 0)
    return total


@pytest.mark.parametrize(("mode", "checkpointing"), [("continuous", False), ("continuous", True), ("discrete", False)])
def test_l_traj_equals_a_hand_computation_from_eager_attention(mode, checkpointing):
    student, processor = _student(mode)
    student.train()
    if checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompt, answer, labels = _batch(processor)
    targets, grids = _targets(prompt, student)
    out = student(answer, labels, traj_targets=targets, traj_grids=grids, vsem_mean=torch.randn(2, 12), **prompt)
    want_rows = _eager_rows(student, prompt, answer, out["latents"])
    for got, want in zip(out["attention_rows"], want_rows, strict=True):
        assert got.shape == (K, want.shape[1])
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)
    hand = sum(_hand_traj(t, r) for t, r in zip(targets, want_rows, strict=True)) / 2
    traj = out["aux_losses"]["traj"]
    assert float(traj.detach()) > 0 and abs(float(traj.detach()) - hand) < 1e-4
    student.zero_grad(set_to_none=True)
    traj.backward()
    layer = model_parts(student.backbone).decoder_layers[0].self_attn
    for proj in (layer.q_proj, layer.k_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert set(out["aux_losses"]) == {"concept", "traj"} and out["latent_hidden"].shape == (2, 64)


def test_the_gate_touches_only_the_answer_rows():
    student, processor = _student("discrete")
    student.eval()
    prompt, answer, labels = _batch(processor)
    with torch.no_grad():
        open_gate = student(answer, labels, **prompt)
        student.gamma = 1e-6
        closed = student(answer, labels, **prompt)
    for a, b in zip(open_gate["attention_rows"], closed["attention_rows"], strict=True):
        torch.testing.assert_close(a, b)  # latent rows keep the image
    assert not torch.allclose(open_gate["loss"], closed["loss"])  # the answer rows lose it


def test_a_few_training_steps_on_built_teacher_data(tmp_path):
    # The builder's output -> rows -> batches -> LatentTrainer with the gate stepped by Eq. 5: every loss logged by
    # name, the gate rising, phi and the LLM trained.
    from latent_core.attention import gate_schedule
    from latent_core.trainer import LatentTrainer
    from lavit.config import LavitConfig
    from lavit.data import LavitCollator, teacher_rows

    shapes, lines = _built_teacher_data(tmp_path, scenes=4)
    rows = teacher_rows(tmp_path / "data")
    assert len(rows) == len(lines) and abs(float(rows[0]["traj_target"].sum()) - 1) < 1e-6

    student, processor = _student("continuous")
    student.phi = type(student.phi)(64, rows[0]["vsem_mean"].shape[0])
    args = LavitConfig(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
        gate_warmup=3, logging_steps=1, report_to=[], use_cpu=True, remove_unused_columns=False,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    gammas = []

    def gate(step):
        student.gamma = gate_schedule(step, args.gate_warmup, args.gate_eps, args.gate)
        gammas.append(student.gamma)

    before = student.phi.net[0].weight.detach().clone()
    trainer = LatentTrainer(
        model=student, args=args, train_dataset=rows, data_collator=LavitCollator(processor), step_schedules=[gate]
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all({"ntp_loss", "concept_loss", "traj_loss"} <= h.keys() for h in logged)
    assert gammas[0] < 1e-5 and gammas[-1] == 1.0 and gammas == sorted(gammas)
    assert not torch.equal(student.phi.net[0].weight.detach(), before)


@pytest.mark.parametrize("mode", ["continuous", "discrete"])
def test_mask_latents_cuts_the_answer_off_the_latent_positions(mode):
    # Table 3's "w/o latent tokens": with mask_latents the queries that produce the answer (the last latent position
    # and the answer tokens) give the latent keys exactly zero attention (without it they do not). The released
    # code's flag masked placeholder ids in the prompt, which leaves the latent attention as it was: this test fails
    # on it.
    from latent_core.attention import record_attention
    from lavit.generate import generate_answers

    student, processor = _student(mode)
    model = student.backbone.eval()
    images = [tiny_image(0, size=84), tiny_image(1, size=84)]
    prompt_len = _batch(processor)[0]["input_ids"].shape[1]
    queries = torch.zeros(2, prompt_len + K, dtype=torch.bool)  # every position after them: the answer
    queries[:, -1] = True  # and the last latent position, which predicts the first answer token
    latent_keys = torch.zeros_like(queries)
    latent_keys[:, prompt_len:] = True
    got = {}
    for mask in (False, True):
        with record_attention(model, queries, latent_keys, extend_queries=True) as rec:
            out = generate_answers(
                model, processor, images, QUESTIONS, student.latent_ids, mode, max_new_tokens=6, mask_latents=mask
            )
        assert out.latent_steps == [K, K] and len(out.texts) == 2
        got[mask] = max(float(w.abs().max()) for w in rec.weights)
    assert got[True] == 0.0 and got[False] > 0


def test_lavit_train_command_saves_a_full_weight_student(tmp_path, monkeypatch):
    # `lavit train` on a build made by the shipped Qwen2.5-VL base (the student: a tiny one saved like a checkpoint):
    # the stage holds the LLM's weights (not the frozen vision tower) and phi, and lavit_train.json the curves.
    from latent_core.testing import save_tiny_model
    from lavit.cli import app
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    shapes, _ = _built_teacher_data(tmp_path, scenes=2)
    base = save_tiny_model("qwen2_5_vl", tmp_path / "student-base")
    train_args = ["train", "--data", str(tmp_path / "data"), "--model", str(base), "--out", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3", "--gate-warmup", "1",
            "--num-latents", "2"]  # fmt: skip
    result = CliRunner().invoke(app, train_args)
    assert result.exit_code == 0, result.output
    stage = tmp_path / "run" / "student"
    weights = load_file(str(stage / "stage_weights.safetensors"))
    assert weights and not any("visual" in k for k in weights)
    assert any(k.startswith("phi.") for k in load_file(str(stage / "extra_modules.safetensors")))
    summary = json.loads((stage / "lavit_train.json").read_text())
    assert summary["steps"] == 2 and summary["gamma"][0] < 1e-5 and summary["loss_curves"]["traj_loss"]
    assert (stage / "lavit_train.png").stat().st_size > 1000

    # `latent eval --method lavit` decodes the stage on the shapes TSV, with and without the latents masked.
    from latent_apps.cli import app as latent_app

    for flag, name in (([], "eval"), (["--mask-latents"], "masked")):
        args = ["eval", "--model", str(stage), "--method", "lavit", "--bench", str(shapes / "test" / "shapes_mc.tsv"),
                "--out", str(tmp_path / name), "--limit", "2", "--max-new-tokens", "4", *flag]  # fmt: skip
        result = CliRunner().invoke(latent_app, args)
        assert result.exit_code == 0, result.output
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["method_options"] == ({"mask_latents": True} if flag else {})
        samples = [
            json.loads(line) for line in next((tmp_path / name).glob("*/samples.jsonl")).read_text().splitlines()
        ]
        assert len(samples) == 2 and all(s["latent_steps"] == 2 for s in samples)
    # --latent-diagnostics: every sample also answered with zeroed, shuffled and masked latents; the masked control's
    # predictions are those of the --mask-latents run; the summary's rates are the records' means.
    args = ["eval", "--model", str(stage), "--method", "lavit", "--bench", str(shapes / "test" / "shapes_mc.tsv"),
            "--out", str(tmp_path / "diag"), "--limit", "2", "--max-new-tokens", "4",
            "--latent-diagnostics"]  # fmt: skip
    result = CliRunner().invoke(latent_app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in next((tmp_path / "diag").glob("*/samples.jsonl")).read_text().splitlines()]
    masked = [json.loads(x) for x in next((tmp_path / "masked").glob("*/samples.jsonl")).read_text().splitlines()]
    assert [r["controls"]["masked"]["prediction"] for r in records] == [r["prediction"] for r in masked]
    controls = json.loads((tmp_path / "diag" / "summary.json").read_text())["benches"]["shapes_mc"]["latent_controls"]
    assert sorted(controls) == ["masked", "shuffle", "zero"]
    for name, entry in controls.items():
        rows = [r["controls"][name] for r in records]
        assert all(c["changed"] == (c["extracted"] != r["extracted"]) for c, r in zip(rows, records, strict=True))
        assert entry["n"] == 2 and entry["change_rate"] == sum(c["changed"] for c in rows) / 2

    # `lavit generate`: the same decoding as a command, one line per question, the gold answer and its score.
    from lavit.filters import answers_match

    for extra in ([], ["--latents", "zero"], ["--mask-latents"]):
        answers = tmp_path / "answers.jsonl"
        gen_args = ["generate", "--stage", str(stage), "--data", str(shapes / "test" / "shapes_mc.tsv"), "--out",
                    str(answers), "--limit", "2", "--max-new-tokens", "4", *extra]  # fmt: skip
        result = CliRunner().invoke(app, gen_args)
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in answers.read_text().splitlines()]
        assert len(rows) == 2 and all(r["latent_steps"] == 2 and r["gold"] in "ABCD" for r in rows)
        assert all(r["correct"] == answers_match(r["answer"], r["gold"]) for r in rows)
    refused = CliRunner().invoke(latent_app, ["eval", "--model", str(stage), "--bench", "x.tsv", "--mask-latents"])
    assert refused.exit_code == 2 and "--method lavit" in refused.output

    # The control: naive SFT on the same samples, decoded by the same method with the same prompt, no latent block.
    result = CliRunner().invoke(app, [*train_args, "--naive"])
    assert result.exit_code == 0, result.output
    naive = tmp_path / "run" / "naive"
    assert json.loads((naive / "latent_stage.json").read_text())["mode"] == "naive"
    assert not any("visual" in k for k in load_file(str(naive / "stage_weights.safetensors")))
    args = ["eval", "--model", str(naive), "--method", "lavit", "--bench", str(shapes / "test" / "shapes_mc.tsv"),
            "--out", str(tmp_path / "naive-eval"), "--limit", "2", "--max-new-tokens", "4"]  # fmt: skip
    result = CliRunner().invoke(latent_app, args)
    assert result.exit_code == 0, result.output
    samples = [
        json.loads(line) for line in next((tmp_path / "naive-eval").glob("*/samples.jsonl")).read_text().splitlines()
    ]
    assert all(s["latent_steps"] == 0 for s in samples)


@pytest.mark.parametrize("mode", ["continuous", "discrete"])
def test_lavit_train_lora_option(tmp_path, mode):
    """--lora-r: an adapter stage (LoRA matrices, the latent tokens' rows, phi), the base's weights untouched;
    latent eval decodes it."""
    from latent_core.testing import save_tiny_model
    from lavit.cli import app
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    shapes, _ = _built_teacher_data(tmp_path, scenes=2)
    base = save_tiny_model("qwen2_5_vl", tmp_path / "student-base")
    args = ["train", "--data", str(tmp_path / "data"), "--model", str(base), "--out", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-2", "--num-latents", "2",
            "--lora-r", "4", "--mode", mode]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stage = tmp_path / "run" / "student"
    adapter = load_file(str(stage / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and not any("visual" in k for k in adapter)
    assert json.loads((stage / "latent_stage.json").read_text())["tokens"] == ["<v-trace_1>", "<v-trace_2>"]
    from latent_apps.cli import app as latent_app

    args = ["eval", "--model", str(stage), "--method", "lavit", "--bench", str(shapes / "test" / "shapes_mc.tsv"),
            "--out", str(tmp_path / "eval"), "--limit", "2", "--max-new-tokens", "3"]  # fmt: skip
    result = CliRunner().invoke(latent_app, args)
    assert result.exit_code == 0, result.output


def _naive_loop(student, prompt, answer, labels, vsem):
    """The reference for continuous mode: no KV cache, no latent-core loop. Each sample alone (no padding); each
    latent step re-runs the language model over the whole sequence so far (Coconut's recompute) and feeds the last
    position's final-norm state as the next input embedding; then one pass over prompt + latents + answer. Returns
    (ntp summed over tokens, number of tokens, concept summed over samples)."""
    parts = model_parts(student.backbone)
    ntp, count, concept = 0.0, 0, 0.0
    for b in range(answer.shape[0]):
        real = prompt["attention_mask"][b].bool()
        ids = torch.cat([prompt["input_ids"][b][real], torch.tensor(student.latent_ids), answer[b]])[None]
        types = torch.cat([prompt["mm_token_type_ids"][b][real], torch.zeros(K + answer.shape[1], dtype=torch.long)])
        full = {
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types[None],
            "pixel_values": prompt["pixel_values"][_pixel_slice(prompt, b)],
            "image_grid_thw": prompt["image_grid_thw"][b : b + 1],
        }  # fmt: skip
        captured: dict = {}
        hook = parts.language_model.register_forward_pre_hook(
            lambda m, a, kw, captured=captured: captured.update(kw), with_kwargs=True
        )
        student.backbone(**full)  # the embeddings (image features in place) and M-RoPE positions of the sequence
        hook.remove()
        embeds, positions = captured["inputs_embeds"], captured["position_ids"]
        start = int(real.sum())
        for i in range(1, K):
            states = parts.language_model(
                inputs_embeds=embeds[:, : start + i], position_ids=positions[..., : start + i], use_cache=False
            ).last_hidden_state
            embeds = torch.cat([embeds[:, : start + i], states[:, -1:], embeds[:, start + i + 1 :]], 1)
        hidden = parts.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        logits = parts.lm_head(hidden[:, start + K - 1 : start + K - 1 + answer.shape[1]]).float()[0]
        keep = labels[b] != -100
        ntp = ntp + torch.nn.functional.cross_entropy(logits[keep], labels[b][keep], reduction="sum")
        count += int(keep.sum())
        h_z = hidden[0, start + K - 1]
        concept = concept + 1 - torch.nn.functional.cosine_similarity(student.phi(h_z)[None], vsem[b : b + 1])[0]
    return ntp, count, concept


def test_continuous_mode_equals_a_naive_recompute_loop():
    """Losses and every gradient of the cached continuous forward equal a no-cache recompute loop per sample."""
    student, processor = _student("continuous")
    student.train()
    reference = copy.deepcopy(student)
    prompt, answer, labels = _batch(processor)
    vsem = torch.randn(2, 12)
    out = student(answer, labels, vsem_mean=vsem, **prompt)
    ntp, count, concept = _naive_loop(reference, prompt, answer, labels, vsem)
    torch.testing.assert_close(out["loss"], ntp / count, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["aux_losses"]["concept"], concept / 2, atol=1e-5, rtol=1e-5)
    (out["loss"] + 0.3 * out["aux_losses"]["concept"]).backward()
    (ntp / count + 0.3 * concept / 2).backward()
    compared = 0
    for (name, got), want in zip(student.named_parameters(), reference.parameters(), strict=True):
        if want.grad is None:
            assert got.grad is None or float(got.grad.abs().max()) == 0, name
            continue
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-4, msg=name)
        compared += 1
    assert compared > 20


def test_discrete_mode_is_one_pass(monkeypatch):
    student, processor = _student("discrete")
    prompt, answer, labels = _batch(processor)
    calls = []
    layer = model_parts(student.backbone).decoder_layers[0]
    hook = layer.register_forward_hook(lambda m, a, o: calls.append(1))
    student(answer, labels, **prompt)
    hook.remove()
    assert len(calls) == 1


def test_the_closed_gate_leaves_the_analytic_share_and_keeps_causality():
    """gamma = 1e-6 (Eq. 5 at t = 0): in the first layer each answer row's image mass is exactly
    gamma m / (gamma m + 1 - m) of its open-gate mass m (per head); in every layer it is below 1e-4; prompt and
    latent rows are not gated; changing the last answer token changes no earlier row."""
    from latent_core.attention import record_attention

    student, processor = _student("discrete")
    student.eval()
    prompt, answer, labels = _batch(processor)
    total = prompt["input_ids"].shape[1] + K + answer.shape[1]
    image = torch.nn.functional.pad(image_token_mask(student.backbone, prompt["input_ids"]), (0, K + answer.shape[1]))
    rows = prompt["attention_mask"].bool()
    rows = torch.nn.functional.pad(rows, (0, K + answer.shape[1]), value=True)  # every real position
    response = torch.zeros_like(rows)
    response[:, prompt["input_ids"].shape[1] + K :] = True
    everything = torch.ones(2, total, dtype=torch.bool)

    def run(gamma, tokens):
        student.gamma = gamma
        with torch.no_grad(), record_attention(student.backbone, rows, everything, reduce="none", heads="none") as rec:
            student(tokens, labels, **prompt)
        return rec.weights  # per sample [layers, rows, heads, keys]

    opened, closed = run(1.0, answer), run(1e-6, answer)
    for b in range(2):
        first_answer = int(rows[b].sum()) - answer.shape[1]
        m_open = opened[b][..., image[b]].sum(-1)  # [layers, rows, heads]
        m_closed = closed[b][..., image[b]].sum(-1)
        analytic = 1e-6 * m_open[0] / (1e-6 * m_open[0] + 1 - m_open[0])
        torch.testing.assert_close(m_closed[0, first_answer:], analytic[first_answer:], atol=1e-12, rtol=1e-3)
        assert float(m_closed[:, first_answer:].max()) < 1e-4 and float(m_open[:, first_answer:].min()) > 1e-3
        torch.testing.assert_close(closed[b][:, :first_answer], opened[b][:, :first_answer])  # prompt and latents
    changed = answer.clone()
    changed[:, -1] = 99
    later = run(1e-6, changed)
    for b in range(2):
        torch.testing.assert_close(later[b][:, :-1], closed[b][:, :-1])  # every row before the last one


def test_table_a1_pixel_bounds_and_the_system_prompt_reach_every_path(tmp_path):
    # Table A1's bounds on a processor with the released Qwen2.5-VL's own (3,136 .. 12,845,056 pixels): a 1920 x 1080
    # image goes from 39 x 69 = 2,691 merged tokens to 26 x 47 = 1,222 (by hand: area 2,073,600 > 1,003,520, so
    # both sides shrink by sqrt(2,073,600 / 1,003,520) = 1.4375 and round down to multiples of 28: 728 x 1316).
    from latent_core.testing import save_tiny_model
    from lavit.config import LavitConfig
    from lavit.generate import load_student
    from lavit.inputs import SYSTEM_PROMPT, InputSettings, SettingsMismatchError
    from lavit.trainer import train_student
    from PIL import Image

    _, processor = tiny_model("qwen2_5_vl")
    processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": 12_845_056}
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}], add_generation_prompt=True
    )
    wide = Image.new("RGB", (1920, 1080))
    assert int(processor(images=[wide], text=[chat])["image_grid_thw"].prod()) // 4 == 2691
    assert InputSettings().apply(processor) == InputSettings(SYSTEM_PROMPT, 200_704, 1_003_520)
    assert processor(images=[wide], text=[chat])["image_grid_thw"].tolist() == [[1, 52, 94]]

    # The build (paper defaults) records them; a 96 px scene is scaled up to 448 px: a 16 x 16 merged grid.
    shapes, lines = _built_teacher_data(tmp_path, scenes=2)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["inputs"] == {"system_prompt": SYSTEM_PROMPT, "min_pixels": 200_704, "max_pixels": 1_003_520}
    assert all(line["grid"] == [1, 16, 16] for line in lines)
    # A student with other bounds is refused before it trains; one with the build's records them in its stage.
    base = save_tiny_model("qwen2_5_vl", tmp_path / "student-base")
    common = dict(max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True, save_strategy="no",
                  remove_unused_columns=False, disable_tqdm=True, num_latents=2, gate_warmup=1)  # fmt: skip
    own = LavitConfig(output_dir=str(tmp_path / "own"), min_pixels=None, max_pixels=None, **common)
    with pytest.raises(SettingsMismatchError, match="min_pixels=200704"):
        train_student(own, tmp_path / "data", str(base), tmp_path / "own")
    assert not (tmp_path / "own" / "student").exists()
    paper = LavitConfig(output_dir=str(tmp_path / "run"), **common)
    train_student(paper, tmp_path / "data", str(base), tmp_path / "run")
    info = json.loads((tmp_path / "run" / "student" / "latent_stage.json").read_text())
    assert info["inputs"] == manifest["inputs"]
    # Loading the stage gives its system prompt and a processor that resizes within the bounds, as it trained.
    _, loaded, _, mode, system = load_student(str(tmp_path / "run" / "student"))
    assert (mode, system) == ("continuous", SYSTEM_PROMPT)
    assert loaded(images=[wide], text=[chat])["image_grid_thw"].tolist() == [[1, 52, 94]]
    # The collator writes the system turn instead of the template's default one.
    from lavit.data import LavitCollator, teacher_rows

    batch = LavitCollator(loaded, system=SYSTEM_PROMPT)(teacher_rows(tmp_path / "data")[:1])
    text = loaded.tokenizer.decode(batch["input_ids"][0])
    assert SYSTEM_PROMPT in text and "You are a helpful assistant" not in text
