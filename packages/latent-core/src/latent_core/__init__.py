"""latent-core: the mechanisms shared by Heima, LaViT and LaRe.

Public API (imported lazily, so that ``import latent_core`` and the CLIs' ``--help`` stay fast):

- model families: :data:`FAMILIES`, :func:`family_of`, :func:`get_family`, :func:`model_parts`,
  :func:`image_token_id`, :func:`image_token_mask`, :func:`lora_target_modules`;
- aliases and loading: :data:`ALIASES`, :func:`resolve_model_id`, :func:`load_model`, :func:`load_processor`,
  :func:`load_config`, with :class:`UnknownAliasError`, :class:`ModelNotAvailableError`, :class:`CheckpointError`;
- attention (one registered implementation wrapping SDPA): :func:`attention_bias`, :func:`record_attention`,
  :func:`gate_schedule`, :func:`gate_bias`;
- token surgery: :func:`add_special_tokens`, :func:`trainable_token_indices`;
- hidden-state capture at selected positions (forward and cached ``generate``): :func:`capture_hidden_states`
  with :func:`select_tokens`, :func:`select_predictors`, :func:`select_mask`;
- KV-cached latent loops: :func:`generate_with_latents` (inference) and :func:`forward_with_latents` (training),
  with :func:`distance_halt` for adaptive steps;
- Coconut (continuous thoughts replacing CoT steps by a curriculum, the baseline of every latent method):
  :class:`CoconutConfig`, :func:`train_coconut`, :func:`load_coconut`, :func:`generate_coconut`;
- training: :class:`LatentTrainer`, :class:`LatentTrainingArguments`, :class:`LatentModel`,
  :class:`SupervisedCollator`, :func:`prepare_lora_model`, :func:`export_merged`, :func:`load_stage`,
  :class:`TrainableRows` (new-token rows that train under ZeRO-3 on any device);
- thinking tokens and their states on disk (one format for every writer and reader): :data:`THINKING_STAGES`,
  :func:`thinking_token`, :func:`parse_thinking_token`, :func:`write_states_shard`, :func:`load_states`;
- model families refused with a message: :func:`require_family`, :class:`FamilyError`;
- data readers with skip reports: :func:`read_llava_cot`, :func:`read_visual_cot`, :func:`read_reasoning`,
  :func:`read_vlmevalkit_tsv`, :func:`read_mmvp`, :func:`read_blink`, :class:`ReadReport`, :func:`parse_cot_stages`;
- the tiny model zoo for tests: :func:`latent_core.testing.tiny_model`.
"""

from __future__ import annotations

from latent_core.exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # families.py
    "FAMILIES": "families",
    "FamilyError": "families",
    "FamilySpec": "families",
    "VISION_FAMILIES": "families",
    "require_family": "families",
    "ModelParts": "families",
    "family_of": "families",
    "family_of_processor": "families",
    "get_family": "families",
    "image_token_id": "families",
    "image_token_mask": "families",
    "lora_target_modules": "families",
    "model_parts": "families",
    # attention.py
    "AttentionRecorder": "attention",
    "attention_bias": "attention",
    "gate_bias": "attention",
    "gate_schedule": "attention",
    "record_attention": "attention",
    # capture.py
    "HiddenStateRecorder": "capture",
    "capture_hidden_states": "capture",
    "capture_image_features": "capture",
    "select_mask": "capture",
    "select_predictors": "capture",
    "select_tokens": "capture",
    # coconut.py
    "CoconutConfig": "coconut",
    "generate_coconut": "coconut",
    "load_coconut": "coconut",
    "train_coconut": "coconut",
    # latents.py
    "HaltFn": "latents",
    "LatentForward": "latents",
    "LatentGeneration": "latents",
    "LatentState": "latents",
    "StepFn": "latents",
    "distance_halt": "latents",
    "forward_with_latents": "latents",
    "generate_with_latents": "latents",
    # tokens.py
    "add_special_tokens": "tokens",
    "trainable_token_indices": "tokens",
    # trainer.py, collate.py, lora.py, trainable_rows.py
    "LatentModel": "trainer",
    "LatentTrainer": "trainer",
    "LatentTrainingArguments": "trainer",
    "StageError": "trainer",
    "deepspeed_config": "trainer",
    "load_extra_modules": "trainer",
    "load_stage": "trainer",
    "schedule_callback": "trainer",
    "SupervisedCollator": "collate",
    "default_lora_config": "lora",
    "export_merged": "lora",
    "prepare_lora_model": "lora",
    "TrainableRows": "trainable_rows",
    "attach_trainable_rows": "trainable_rows",
    "detach_trainable_rows": "trainable_rows",
    "get_trainable_rows": "trainable_rows",
    "merge_trainable_rows": "trainable_rows",
    # readers.py
    "COT_STAGES": "readers",
    "CONCLUSION_TAG": "readers",
    "conclusion_of": "readers",
    "reasoning_token_count": "readers",
    "DataFormatError": "readers",
    "ReadReport": "readers",
    "parse_cot_stages": "readers",
    "read_blink": "readers",
    "read_llava_cot": "readers",
    "read_mmvp": "readers",
    "read_questions": "readers",
    "read_reasoning": "readers",
    "read_visual_cot": "readers",
    "read_vlmevalkit_tsv": "readers",
    # inference.py
    "load_trained": "inference",
    # thinking.py
    "THINKING_STAGES": "thinking",
    "load_states": "thinking",
    "parse_thinking_token": "thinking",
    "thinking_token": "thinking",
    "thinking_tokens": "thinking",
    "write_states_shard": "thinking",
    # hub.py
    "ALIASES": "hub",
    "DATASET_ALIASES": "hub",
    "CheckpointError": "hub",
    "check_tensors": "hub",
    "load_tensors": "hub",
    "ModelNotAvailableError": "hub",
    "UnknownAliasError": "hub",
    "load_config": "hub",
    "load_model": "hub",
    "load_pretrained": "hub",
    "load_processor": "hub",
    "resolve_dataset_id": "hub",
    "resolve_model_id": "hub",
}

__all__ = ["__version__", *_EXPORTS]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
