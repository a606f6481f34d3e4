"""Evaluation methods: how a model turns a batch of benchmark samples into answers.

A *method* is a callable ``method(model, processor, samples, max_new_tokens) -> list[Generation]``, one
:class:`Generation` per sample, in order. Methods are registered by name with a *factory* (a callable that
takes keyword options and returns the method), so that ``get_method("heima", num_thoughts=3)`` can configure
one. ``plain`` (registered here) is batched greedy ``generate``; Heima, LaViT and LaRe register theirs later.

The ``plain`` prompt, in the VLMEvalKit / LLaVA style, is one user turn of the family's chat template holding
the image and this text::

    [<hint>\\n]<question>
    A. <option A>
    B. <option B>
    Answer with the option's letter from the given choices directly.

and, for samples without options (yes/no, numbers, short answers)::

    [<hint>\\n]<question>
    Answer the question using a single word or phrase.

Generation is greedy (``do_sample=False``; Heima's authors sample at T=0.6, which makes accuracy and token
counts irreproducible) with the prompts of a batch padded on the LEFT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

__all__ = [
    "MCQ_INSTRUCTION",
    "SHORT_INSTRUCTION",
    "EvalMethod",
    "Generation",
    "PlainMethod",
    "UnknownMethodError",
    "build_prompt_text",
    "build_inputs",
    "count_generated",
    "eos_token_ids",
    "get_method",
    "register_method",
    "registered_methods",
]

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."


@dataclass
class Generation:
    """What a method returns for one sample.

    Attributes:
        text: the generated answer text (special tokens removed).
        generated_tokens: every new token up to and including the end-of-sequence token (latent steps that
            emit no token are not counted here; see ``latent_steps``).
        reasoning_tokens: tokens spent on (latent or explicit) reasoning, when the method can tell; ``None``
            for ``plain``.
        latent_steps: latent reasoning steps (continuous thoughts); ``None`` for methods without them.
        latency_s: this sample's own latency when the method measures it; ``None`` lets the runner use
            batch wall time / batch size.
    """

    text: str
    generated_tokens: int
    reasoning_tokens: int | None = None
    latent_steps: int | None = None
    latency_s: float | None = None


class EvalMethod(Protocol):
    """``method(model, processor, samples, max_new_tokens) -> list[Generation]`` (one per sample, in order).

    Each sample is a reader record: ``id``, ``question``, ``options`` (letter -> text, may be empty), ``hint``,
    ``image`` (PIL image or ``None``), ``answer``, ``category``.
    """

    def __call__(
        self, model: Any, processor: Any, samples: Sequence[dict[str, Any]], max_new_tokens: int
    ) -> list[Generation]: ...


class UnknownMethodError(KeyError):
    """``get_method`` was given a name that no one registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


_REGISTRY: dict[str, Callable[..., EvalMethod]] = {}


def register_method(name: str, factory: Callable[..., EvalMethod], *, overwrite: bool = False) -> None:
    """Register ``factory`` (keyword options -> :class:`EvalMethod`) under ``name``.

    Raises:
        ValueError: ``name`` is taken and ``overwrite`` is False.
    """
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"an evaluation method named {name!r} is already registered; pass overwrite=True")
    _REGISTRY[name] = factory


def registered_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str, **options: Any) -> EvalMethod:
    """Build the method registered as ``name`` with ``options``.

    Raises:
        UnknownMethodError: no method of that name; the message lists the registered ones.
    """
    if name not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown evaluation method {name!r}; registered methods: {', '.join(registered_methods())}"
        )
    return _REGISTRY[name](**options)


def build_prompt_text(sample: dict[str, Any]) -> str:
    """The user text of the ``plain`` prompt (see the module docstring)."""
    lines = []
    hint = sample.get("hint")
    if hint:
        lines.append(str(hint).strip())
    lines.append(str(sample["question"]).strip())
    options = sample.get("options") or {}
    if options:
        lines.extend(f"{key}. {str(value).strip()}" for key, value in options.items())
        lines.append(MCQ_INSTRUCTION)
    else:
        lines.append(SHORT_INSTRUCTION)
    return "\n".join(lines)


def _family(model: Any) -> str:
    from latent_core import family_of

    return family_of(model).name


def _images_of(sample: dict[str, Any]) -> list[Any]:
    """A sample's images in prompt order: ``images`` (BLINK has up to four) or the single ``image``."""
    images = sample.get("images") or ([sample["image"]] if sample.get("image") is not None else [])
    return [image.convert("RGB") for image in images]


def build_inputs(model: Any, processor: Any, samples: Sequence[dict[str, Any]], texts: Sequence[str] | None = None):
    """Batched, LEFT-padded model inputs: each sample's image(s) and user text in the family's chat template.

    ``texts`` replaces the :func:`build_prompt_text` user texts (other methods add their own instructions).
    Returns ``(inputs, prompt_length)``; text-only models (``causal_lm``) get the text alone.
    """
    family = _family(model)
    texts = list(texts) if texts is not None else [build_prompt_text(s) for s in samples]
    tokenizer = getattr(processor, "tokenizer", processor)
    chats = []
    per_sample = [_images_of(s) for s in samples]
    for images, text in zip(per_sample, texts, strict=True):
        if family == "causal_lm" or not images:
            content: Any = text if family == "causal_lm" else [{"type": "text", "text": text}]
        else:
            content = [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
        chats.append(
            processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        )
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if family == "causal_lm":
            inputs = processor(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            if any(per_sample) and not all(per_sample):
                raise ValueError("a batch mixes samples with and without images; batch them separately")
            kwargs: dict[str, Any] = dict(text=chats, return_tensors="pt", padding=True, add_special_tokens=False)
            if all(per_sample):
                # mllama takes one list of images per sample; the others one flat list in prompt order.
                kwargs["images"] = per_sample if family == "mllama" else [i for imgs in per_sample for i in imgs]
            inputs = processor(**kwargs)
    finally:
        tokenizer.padding_side = side
    return inputs, inputs["input_ids"].shape[1]


def eos_token_ids(model: Any, processor: Any) -> set[int]:
    """End-of-sequence ids: the generation config's (one or a list) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos])
    ids.add(getattr(processor, "tokenizer", processor).eos_token_id)
    return {int(i) for i in ids if i is not None}


def count_generated(new_tokens: torch.Tensor, eos_ids: set[int]) -> int:
    """Tokens up to and including the first end-of-sequence token (all of them if there is none)."""
    for i, token in enumerate(new_tokens.tolist()):
        if token in eos_ids:
            return i + 1
    return len(new_tokens)


class PlainMethod:
    """Batched greedy ``model.generate`` on the ``plain`` prompt (the baseline of every table)."""

    def __call__(
        self, model: Any, processor: Any, samples: Sequence[dict[str, Any]], max_new_tokens: int
    ) -> list[Generation]:
        tokenizer = getattr(processor, "tokenizer", processor)
        inputs, prompt_len = build_inputs(model, processor, samples)
        inputs = inputs.to(model.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        import torch

        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        eos_ids = eos_token_ids(model, processor)
        results = []
        for row in out[:, prompt_len:].cpu():
            n = count_generated(row, eos_ids)
            text = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            results.append(Generation(text=text, generated_tokens=n))
        return results


register_method("plain", PlainMethod)

# Method adapters of the method packages register themselves on import.
from latent_apps.eval import heima_method  # noqa: E402, F401  (registers "heima")
