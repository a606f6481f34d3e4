"""The extractor (Appendix B) and the composed model (`lare init`): shapes, gradients, the query's layer mixing by
hand, the parts' weights carried over exactly, and the checkpoint round trip with its errors."""

from __future__ import annotations

import pytest
import torch
from lare import LareConfig
from lare.extractor import EXTRACTOR_WEIGHTS, Extractor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _extractor(query: str = "layers") -> Extractor:
    torch.manual_seed(0)
    config = LareConfig(extractor_hidden=24, extractor_heads=4, extractor_layers=2, query=query)
    return Extractor(d_model=16, n_hidden_states=5, d_vision=12, d_embed=20, config=config)


def test_extractor_shapes_and_gradients_reach_every_parameter():
    extractor = _extractor()
    assert len(extractor.layers) == 2 and extractor.layers[0].self_attn.num_heads == 4
    hidden_states = [torch.randn(3, 16, requires_grad=True) for _ in range(5)]
    states = torch.stack([extractor.query(hidden_states, hidden_states[-1])] * 2, 1)  # a 2-step sequence
    v_local = torch.randn(3, 9, 12, requires_grad=True)
    z = extractor(states, v_local)
    assert z.shape == (3, 20)
    z.square().sum().backward()
    for name, param in extractor.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert v_local.grad.abs().sum() > 0 and all(h.grad.abs().sum() > 0 for h in hidden_states)


def test_query_is_a_softmax_mix_of_every_layer_then_layer_norm():
    extractor = _extractor()
    with torch.no_grad():
        extractor.layer_logits.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5]))
    hidden_states = [torch.randn(2, 16) for _ in range(5)]
    w = torch.softmax(torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5]), 0)
    mixed = sum(w[i] * hidden_states[i] for i in range(5))
    expected = torch.nn.functional.layer_norm(
        mixed, (16,), extractor.query_norm.weight, extractor.query_norm.bias, extractor.query_norm.eps
    )
    torch.testing.assert_close(extractor.query(hidden_states, torch.zeros(2, 16)), expected)
    last = _extractor("last")
    assert last.layer_logits is None
    h = torch.randn(2, 16)
    torch.testing.assert_close(last.query(None, h), last.query_norm(h))
    with pytest.raises(ValueError, match="mixes 5 hidden states"):
        extractor.query(hidden_states[:3], h)


def test_extractor_self_attention_is_causal_and_reads_v_local():
    extractor = _extractor().eval()
    states = torch.randn(2, 3, 16)
    v_local = torch.randn(2, 4, 12)
    z = extractor(states, v_local)
    # the output is the last position's: earlier positions cannot see it, but it sees them
    assert not torch.allclose(extractor(states[:, [1, 1, 2]], v_local), z)
    assert not torch.allclose(extractor(states, v_local.flip(0)), z)
    # a first position computed alone equals the same position inside a longer run's prefix (causality)
    first_alone = extractor.layers[0](states[:, :1], v_local)
    first_in_run = extractor.layers[0](states, v_local)[:, :1]
    torch.testing.assert_close(first_alone, first_in_run, atol=1e-6, rtol=0)


def test_compose_carries_the_parts_weights_exactly(lare_parts, tiny_lare):
    from transformers import CLIPVisionModel, Qwen2ForCausalLM

    model, processor = tiny_lare
    vlm = model.vlm
    clip = CLIPVisionModel.from_pretrained(lare_parts[0])
    qwen = Qwen2ForCausalLM.from_pretrained(lare_parts[1])
    for name, value in clip.state_dict().items():
        assert torch.equal(vlm.model.vision_tower.state_dict()[name], value), name
    new_ids = {model.bot_id, model.eot_id, vlm.config.image_token_index}
    old_vocab = qwen.config.vocab_size
    for name, value in qwen.model.state_dict().items():
        got = vlm.model.language_model.state_dict()[name]
        if name == "embed_tokens.weight":  # the table grew by the three new tokens; the old rows are untouched
            assert torch.equal(got[:old_vocab], value) and min(new_ids) >= old_vocab
        else:
            assert torch.equal(got, value), name
    tokenizer = processor.tokenizer
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<bot>", "<eot>")] == [model.bot_id, model.eot_id]
    assert tokenizer.convert_tokens_to_ids("<image>") == vlm.config.image_token_index
    assert vlm.config.vision_feature_layer == -2 and vlm.config.image_seq_length == 256
    assert model.grid() == 16 and model.step().window == 4
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
    )
    assert "<image>\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    # the default window is half the grid side (w = 8 of 16)
    assert LareConfig().window_for(16) == 8 and LareConfig().window_for(6) == 3


def test_checkpoint_round_trip_and_errors(tiny_lare, tmp_path):
    from lare import load_lare
    from latent_core.hub import CheckpointError

    model, processor = tiny_lare
    out = model.save_pretrained(tmp_path / "ck", processor)
    loaded, loaded_processor = load_lare(out, device="cpu", halt="cos", threshold=0.1)
    assert loaded.config.halt == "cos" and loaded.config.threshold == 0.1 and loaded.config.window == 4
    for (name, a), b in zip(model.extractor.state_dict().items(), loaded.extractor.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name, value in model.vlm.state_dict().items():
        assert torch.equal(loaded.vlm.state_dict()[name], value), name
    assert (loaded.bot_id, loaded.eot_id) == (model.bot_id, model.eot_id)

    with pytest.raises(FileNotFoundError, match="lare init"):
        load_lare(tmp_path, device="cpu")
    # each broken part gives one error naming it, before the model's weights load
    import json
    import shutil

    from lare.config import CONFIG_NAME
    from safetensors.torch import load_file, save_file

    def broken(name, change):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        change(copy)
        return copy

    config = json.loads((out / CONFIG_NAME).read_text())
    cases = {
        "typed": (lambda d: (d / CONFIG_NAME).write_text(json.dumps({**config, "window": "4"})), "wrongly typed"),
        "window": (lambda d: (d / CONFIG_NAME).write_text(json.dumps({**config, "stride": 0})), "stride"),
        "cut": (lambda d: (d / EXTRACTOR_WEIGHTS).write_bytes((out / EXTRACTOR_WEIGHTS).read_bytes()[:100]),
                "corrupt|truncat"),
        "gone": (lambda d: (d / EXTRACTOR_WEIGHTS).unlink(), "no extractor"),
        "hidden": (lambda d: (d / CONFIG_NAME).write_text(json.dumps({**config, "extractor_hidden": 64})),
                   "wrong shape"),
        "keys": (lambda d: save_file({**load_file(d / EXTRACTOR_WEIGHTS), "extra.weight": torch.zeros(1)},
                                     d / EXTRACTOR_WEIGHTS), "unexpected: extra.weight"),
        "tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "processor"),
        "weights": (lambda d: (d / "model.safetensors").unlink(), "weights"),
    }  # fmt: skip
    for name, (change, message) in cases.items():
        with pytest.raises((CheckpointError, ValueError), match=message):
            load_lare(broken(name, change), device="cpu")


def test_from_llava_adds_the_delimiters_and_a_fresh_extractor(tmp_path):
    import json

    from lare import from_llava
    from latent_core.testing import save_tiny_model

    path = save_tiny_model("llava", tmp_path / "llava")
    model, processor = from_llava(str(path), LareConfig(extractor_hidden=32, extractor_heads=4))
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<bot>") == model.bot_id and model.grid() == 16
    assert model.step().window == 8  # half of the 16x16 grid
    assert not model.training and not model.extractor.training
    # a llava that keeps CLIP's class token has no square grid of patches: refused when the model is built
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vision_feature_select_strategy": "full"}))
    with pytest.raises(ValueError, match="patch tokens alone"):
        from_llava(str(path), LareConfig(extractor_hidden=32, extractor_heads=4))


def test_compose_takes_the_vision_half_of_a_full_clip_checkpoint(lare_parts, tmp_path):
    # openai/clip-vit-large-patch14 is a CLIPModel (text and vision): its vision tower and processor are used
    from lare import compose
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=4)  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip-full")
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
        tmp_path / "clip-full"
    )
    model, _ = compose(
        str(tmp_path / "clip-full"), str(lare_parts[1]), LareConfig(extractor_hidden=32, extractor_heads=4)
    )
    tower = model.vlm.model.vision_tower.state_dict()
    for name, value in clip.vision_model.state_dict().items():
        assert torch.equal(tower[name], value), name
