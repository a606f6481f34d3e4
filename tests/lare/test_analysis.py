"""Table 5's attention analysis: the first answer token's attention on the image against eager attention computed
independently (the model's own forward with output_attentions), the statistics against scipy on planted samples,
and the command."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from latent_core.testing import tiny_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["What is it?", "How many red circles are in the picture? Count them all."]


def _eager_mass(vlm, inputs_embeds, mask, image_positions):
    eager = copy.deepcopy(vlm)
    eager.set_attn_implementation("eager")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = eager.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, output_attentions=True
        )
    rows = torch.stack(out.attentions).mean((0, 2))[:, -1]  # [B, S]: layers and heads averaged, last query
    return torch.stack([rows[b, image_positions[b]].sum() for b in range(rows.shape[0])])


def test_plain_and_lare_against_eager_attention(tiny_lare):
    from lare.analysis import first_token_visual_attention
    from lare.generate import encode_questions, generate_answers

    model, processor = tiny_lare
    images = [tiny_image(i, 64) for i in range(2)]
    inputs = encode_questions(processor, images, QUESTIONS)
    vlm = model.vlm
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image = ids == vlm.config.image_token_index
    with torch.no_grad():
        features = vlm.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        embeds = vlm.get_input_embeddings()(ids).clone()
        embeds[image] = torch.cat(list(features)).reshape(-1, embeds.shape[-1])
    positions = [image[b].nonzero().flatten() for b in range(2)]

    plain = first_token_visual_attention(vlm, processor, images, QUESTIONS)
    torch.testing.assert_close(plain, _eager_mass(vlm, embeds, mask, positions), atol=1e-5, rtol=0)

    latents = generate_answers(model, processor, images, QUESTIONS, 1, halt="none").latents
    embed = vlm.get_input_embeddings()
    with torch.no_grad():
        tail = torch.cat(
            [embed(torch.tensor([[model.bot_id]] * 2)), latents, embed(torch.tensor([[model.eot_id]] * 2))], 1
        )
    sequence = torch.cat([embeds, tail], 1)
    full_mask = torch.cat([mask, mask.new_ones((2, tail.shape[1]))], 1)
    got = first_token_visual_attention(model, processor, images, QUESTIONS)
    torch.testing.assert_close(got, _eager_mass(vlm, sequence, full_mask, positions), atol=1e-5, rtol=0)
    assert bool((got > 0).all() and (got < 1).all())


def test_statistics_match_scipy_on_planted_samples():
    from lare.analysis import compare_distributions
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, generator=g) * 0.1 + 0.5, torch.rand(50, generator=g) * 0.1 + 0.3
    got = compare_distributions(a, b)
    assert got["t_p"] < 1e-10 and got["u_p"] < 1e-10 and got["mean_a"] > got["mean_b"]
    assert got["u"] == stats.mannwhitneyu(a.double().numpy(), b.double().numpy()).statistic
    same = compare_distributions(a, a.clone())
    assert same["t_p"] == pytest.approx(1.0) and same["u_p"] == pytest.approx(1.0, abs=1e-6)


def test_analyze_command(tiny_lare, tmp_path):
    from lare.cli import app
    from typer.testing import CliRunner

    model, processor = tiny_lare
    lare = model.save_pretrained(tmp_path / "lare", processor)
    model.vlm.save_pretrained(tmp_path / "plain")
    processor.save_pretrained(tmp_path / "plain")
    args = ["analyze", "--model", f"lare={lare}", "--model", f"plain={tmp_path / 'plain'}", "--data",
            "data/fixtures/vlmevalkit/MMStar_mini.tsv", "--limit", "4", "--out", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert summary["n"] == 4 and set(summary["comparisons"]) == {"lare vs plain"}
    assert (tmp_path / "out" / "attention.png").stat().st_size > 1000
