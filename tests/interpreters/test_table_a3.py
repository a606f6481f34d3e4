"""The interpreters' training setting (paper 000 Table A3 / "the same LoRA setting" as Heima) and its CLI.

- the placeholder defaults to a reserved token of the interpreter's tokenizer (Llama-3.x has 248), else an unused
  special token: no new vocabulary, so the adapter holds no embedding table; a tokenizer without either gets a new
  <THOUGHT>, whose rows (not the whole tables: 239 MB on SmolLM2-135M) the adapter saves, tied head or untied;
- LoRA adapts lm_head where it is untied; AdamW weight decay 0.01; activation checkpointing on;
- --placeholder / --template reach the trained interpreter; a VLM is refused as interpreter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from interpreters.cli import app
from interpreters.config import DEFAULT_PLACEHOLDER, InterpreterConfig, choose_placeholder, placeholder_for
from latent_core.testing import save_tiny_model, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

RESERVED = [f"<|reserved_special_token_{i}|>" for i in (0, 1, 2)]
runner = CliRunner()


def _base(out: Path, reserved: bool, tied: bool = False) -> Path:
    """A tiny Llama-3-style text LM saved like a checkpoint; with ``reserved``, its vocabulary has reserved tokens
    (added in 2, 0, 1 order: the default must pick token 0 by number, not by position); ``tied``: one table for the
    embedding and ``lm_head``."""
    model, tokenizer = tiny_model("causal_lm")
    if tied:
        from transformers import LlamaForCausalLM

        model.config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = LlamaForCausalLM(model.config)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if reserved:
        tokenizer.add_special_tokens({"additional_special_tokens": [RESERVED[2], RESERVED[0], RESERVED[1]]})
        model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _captures(out: Path, d: int = 64, n: int = 8) -> Path:
    out.mkdir()
    tensors = {f"s{i}/<THINKING_OF_SUMMARY>": torch.randn(d) for i in range(n)}
    lines = [{"id": f"s{i}", "stage": "summary", "token": "<THINKING_OF_SUMMARY>", "question": "What is there?",
              "target": "a red circle", "position": 5, "mode": "predictor", "file": "shard-00000.safetensors",
              "key": f"s{i}/<THINKING_OF_SUMMARY>"} for i in range(n)]  # fmt: skip
    save_file(tensors, str(out / "shard-00000.safetensors"))
    (out / "index.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def test_placeholder_default():
    _, tokenizer = tiny_model("causal_lm")  # Llama-3 style: <|python_tag|> is special, unnamed and not in the template
    assert choose_placeholder(tokenizer) == ("<|python_tag|>", "unused special token")
    tokenizer.add_special_tokens({"additional_special_tokens": [RESERVED[2], RESERVED[0]]})
    assert choose_placeholder(tokenizer) == ("<|reserved_special_token_0|>", "reserved")
    assert placeholder_for(tokenizer, "<MINE>") == "<MINE>"


def test_unused_special_tokens_are_those_with_no_job():
    from tokenizers import AddedToken

    tokenizer = tiny_model("qwen2_5_vl")[1].tokenizer  # every special token has a job (turns, images, padding)
    assert choose_placeholder(tokenizer) == (DEFAULT_PLACEHOLDER, "added")
    # SmolLM2 / StarCoder-style vocabularies: special tokens of the pre-training data that chat never uses.
    tokenizer.add_tokens([AddedToken("<jupyter_start>", special=True), AddedToken("<repo_name>", special=True)])
    assert choose_placeholder(tokenizer) == ("<repo_name>", "unused special token")
    tokenizer.chat_template += "{{ '<repo_name>' }}"  # a token the template writes is in use
    assert choose_placeholder(tokenizer) == (DEFAULT_PLACEHOLDER, "added")


def test_paper_defaults():
    config = InterpreterConfig(use_cpu=True)
    assert (config.weight_decay, config.learning_rate, config.per_device_train_batch_size) == (0.01, 5e-4, 8)
    assert (config.lora_r, config.lora_alpha, config.warmup_steps) == (16, 32, 100)
    assert config.activation_checkpointing and config.lora_include_lm_head and config.placeholder is None


def _adapter_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


def _vocabulary_table(key: str) -> bool:
    """A whole vocabulary-sized table saved with the adapter (embedding or lm_head)."""
    return key.endswith(("embed_tokens.weight", "lm_head.base_layer.weight", "lm_head.weight"))


def _train(tmp_path: Path, base: Path, *extra: str) -> Path:
    captures = _captures(tmp_path / "captures")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--capture", str(captures), "--stage", "summary", "--model", str(base),
                                 "--run-dir", str(run), "--max-steps", "2", "--batch-size", "4", *extra])  # fmt: skip
    assert result.exit_code == 0, result.output
    return run / "summary"


def test_reserved_placeholder_keeps_the_adapter_small(tmp_path, monkeypatch):
    from latent_core.trainer import LatentModel

    calls = []
    original = LatentModel.activation_checkpointing_enable
    monkeypatch.setattr(LatentModel, "activation_checkpointing_enable",
                        lambda self, **kw: (calls.append(kw), original(self, **kw))[1])  # fmt: skip
    out = _train(tmp_path, _base(tmp_path / "lm", reserved=True))
    info = json.loads((out / "latent_stage.json").read_text())
    assert info["interpreter"]["placeholder"] == "<|reserved_special_token_0|>"
    keys = _adapter_keys(out)
    assert not any(_vocabulary_table(k) for k in keys)  # no vocabulary change: no embedding / head table saved
    assert any("lm_head.lora_A" in k for k in keys)  # the untied head is adapted, as Heima's
    assert len(calls) == 1  # activation checkpointing was switched on in the backbone
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.weight_decay == 0.01


@pytest.mark.parametrize("tied", [False, True])
def test_a_new_placeholder_is_saved_as_its_rows_not_the_tables(tmp_path, monkeypatch, tied):
    """A vocabulary with no spare row and no reserved token (SmolLM2-135M has tied tables, Vicuna untied): the new
    <THOUGHT> grows the tables; the adapter holds its rows only, and the interpreter reloads to the trained model."""
    from interpreters import trainer as interpreters_trainer
    from interpreters.model import load_interpreter

    base = _base(tmp_path / "lm", reserved=False, tied=tied)
    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    prompt = "According to question: What is there?, can you explain the thinking progress <THOUGHT>?"
    trained: dict[str, torch.Tensor] = {}

    class Recording(interpreters_trainer.LatentTrainer):
        def train_and_save(self, *args, **kwargs):
            summary = super().train_and_save(*args, **kwargs)
            model = self.model.eval()  # the reference: the model as training left it, in memory
            ids = self.processing_class([prompt] * 2, return_tensors="pt").input_ids
            with torch.no_grad():
                trained["logits"] = model(input_ids=ids, hidden=hidden)["logits"]
            return summary

    monkeypatch.setattr(interpreters_trainer, "LatentTrainer", Recording)
    out = _train(tmp_path, base, "--placeholder", "<THOUGHT>", "--no-activation-checkpointing")
    rows = len(load_model_and_tokenizer(base)[1]) + 1
    keys = _adapter_keys(out)
    assert not any(_vocabulary_table(k) for k in keys)  # no whole table ...
    assert any("trainable_tokens_delta" in k for k in keys)  # ... the placeholder's rows instead
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        assert (rows, 64) not in shapes.values(), path  # no table, under any name
        assert all(v == (1, 64) for k, v in shapes.items() if "trainable_tokens_delta" in k)  # one row each
    info = json.loads((out / "latent_stage.json").read_text())["interpreter"]
    assert info["placeholder"] == "<THOUGHT>" and "saved as rows" in info["placeholder_origin"]

    loaded, tokenizer = load_interpreter(out, device="cpu")
    ids = tokenizer([prompt] * 2, return_tensors="pt").input_ids
    assert loaded.backbone.get_input_embeddings().weight.shape[0] == rows
    with torch.no_grad():
        logits = loaded(input_ids=ids, hidden=hidden)["logits"]
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=1e-5)


def test_placeholder_and_template_flags(tmp_path):
    template = "Q: {question} State: {placeholder}. Explain."
    out = _train(tmp_path, _base(tmp_path / "lm", reserved=True), "--placeholder", "<|reserved_special_token_2|>",
                 "--template", template)  # fmt: skip
    info = json.loads((out / "latent_stage.json").read_text())["interpreter"]
    assert (info["placeholder"], info["template"]) == ("<|reserved_special_token_2|>", template)
    result = runner.invoke(app, ["train", "--capture", str(tmp_path / "captures"), "--template", "no fields",
                                 "--run-dir", str(tmp_path / "r2")])  # fmt: skip
    assert (
        result.exit_code == 2
        and result.output.startswith("error: ")
        and "template must contain {question}" in (result.output)
    )


@pytest.mark.parametrize("flag", ["--stage", "--projector"])
def test_choice_flags(flag, tmp_path):
    result = runner.invoke(app, ["train", "--capture", str(tmp_path), flag, "bogus"])
    assert result.exit_code == 2 and "'bogus' is not one of" in result.output


def test_a_vision_model_is_refused_as_interpreter(tmp_path):
    base = save_tiny_model("mllama", tmp_path / "vlm")
    captures = _captures(tmp_path / "captures")
    result = runner.invoke(app, ["train", "--capture", str(captures), "--model", str(base), "--run-dir",
                                 str(tmp_path / "run"), "--max-steps", "1"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "family is mllama" in result.output and "causal_lm" in result.output


def test_a_new_placeholder_in_spare_rows_reloads_exactly(tmp_path):
    """A vocabulary with spare rows (Qwen2.5 pads its tables): the new <THOUGHT> takes a spare row, nothing is
    resized, yet its rows were initialised for training; the saved interpreter must reload those rows, not the
    base checkpoint's spare-row values."""
    from interpreters.model import load_interpreter
    from latent_core.tokens import add_special_tokens

    base = tmp_path / "lm"
    model, tokenizer = tiny_model("causal_lm")
    model.resize_token_embeddings(len(tokenizer) + 6)  # spare rows past the tokenizer
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tokenizer) :] = 7.0  # spare rows unlike any initialisation
        model.get_input_embeddings().weight[len(tokenizer) :] = 7.0
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = _train(tmp_path, base, "--placeholder", "<THOUGHT>")
    # The reference: the rows training started from, re-made independently on a fresh copy of the base.
    fresh, fresh_tokenizer = load_model_and_tokenizer(base)
    (thought,) = add_special_tokens(fresh, fresh_tokenizer, ["<THOUGHT>"])
    loaded, loaded_tokenizer = load_interpreter(out, device="cpu")
    assert loaded_tokenizer.convert_tokens_to_ids("<THOUGHT>") == thought == len(tokenizer)
    head = loaded.backbone.get_output_embeddings()
    head = getattr(head, "base_layer", head)
    torch.testing.assert_close(head.weight[thought], fresh.get_output_embeddings().weight[thought])
    assert not torch.equal(head.weight[thought], torch.full_like(head.weight[thought], 7.0))


def load_model_and_tokenizer(path):
    from latent_core.hub import load_model, load_processor

    return load_model(str(path)), load_processor(str(path))
