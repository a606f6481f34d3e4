"""Evaluation methods: how a model turns a batch of benchmark samples into answers.

A *method* is a callable ``method(model, processor, samples, max_new_tokens) -> list[Generation]``, one
:class:`Generation` per sample, in order. Methods are registered by name with a *factory* (a callable that
takes keyword options and returns the method), so that ``get_method("heima", batch_size=4)`` can configure
one. ``plain``, ``cot``, ``direct`` and ``partial`` are registered here; Coconut, Heima, LaViT and LaRe register theirs.

A method says how it is asked and read (class attributes the runner uses):

- ``instruction``: the last line of an open question's prompt. Prompts come from the one builder
  :func:`latent_core.prompts.question_text` that training uses too: a multiple-choice question lists its options
  after ``Options:`` and ends with "Please answer with the letter of the correct option."; ``plain`` (an untrained
  chat model) adds "Answer the question using a single word or phrase." to open questions, the staged methods
  (``cot``, ``heima``: models trained on LLaVA-CoT-style answers) add nothing, as in their training data. A sample
  with a ``prompt`` (a LLaVA-CoT JSONL bench: the human turn as trained) is asked verbatim.
- ``staged``: the output is a staged chain of thought; its answer is read **only** from a closed
  ``<CONCLUSION>..</CONCLUSION>`` block, and an output without one is *unanswered* (never guessed from the caption or
  reasoning text).
- ``default_max_new_tokens``: the budget when the user gives none: 64 for ``plain``, 1024 for ``cot`` (a chain of
  thought must reach its conclusion), 512 for ``heima``. A generation that stops at the budget without an
  end-of-sequence token is flagged ``truncated`` and counted.

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
    "SHORT_INSTRUCTION",
    "CotMethod",
    "EvalMethod",
    "Generation",
    "PlainMethod",
    "UnknownMethodError",
    "build_prompt_text",
    "build_inputs",
    "control_texts",
    "latent_generations",
    "count_generated",
    "eos_token_ids",
    "get_method",
    "register_method",
    "registered_methods",
]

from latent_core.prompts import SHORT_INSTRUCTION


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
        thinking_tokens: generated thinking tokens (Heima), ``None`` for methods without them.
        truncated: the generation stopped at ``max_new_tokens`` without an end-of-sequence token.
        controls: the answer texts of the same sample under controls (the latent diagnostics: ``zero``,
            ``shuffle``, LaViT's ``masked``), scored like the answer and summarised as ``latent_controls``; ``None``
            if none.
        latent_similarity: the mean cosine of this sample's latents to those of the other samples of its batch
            (:func:`latent_core.diagnostics.pairwise_cosine`; near 1: collapsed latents); ``None`` without latents.
    """

    text: str
    generated_tokens: int
    reasoning_tokens: int | None = None
    latent_steps: int | None = None
    latency_s: float | None = None
    thinking_tokens: int | None = None
    truncated: bool = False
    controls: dict[str, str] | None = None
    latent_similarity: float | None = None


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


def build_prompt_text(sample: dict[str, Any], instruction: str | None = SHORT_INSTRUCTION) -> str:
    """The user text for ``sample``: its ``prompt`` verbatim when it has one (a LLaVA-CoT bench row, asked as
    trained), else :func:`latent_core.prompts.question_text` of its question, options and hint, with
    ``instruction`` closing an open question (see the module docstring)."""
    from latent_core.prompts import question_text

    if sample.get("prompt"):
        return str(sample["prompt"])
    return question_text(sample["question"], sample.get("options") or None, sample.get("hint"), instruction)


def _family(model: Any) -> str:
    from latent_core import family_of

    return family_of(model).name


def _images_of(sample: dict[str, Any]) -> list[Any]:
    """A sample's images in prompt order: ``images`` (BLINK has up to four) or the single ``image``."""
    images = sample.get("images") or ([sample["image"]] if sample.get("image") is not None else [])
    return [image.convert("RGB") for image in images]


def build_inputs(model: Any, processor: Any, samples: Sequence[dict[str, Any]], texts: Sequence[str] | None = None):
    """Batched, LEFT-padded model inputs: each sample's image(s) and user text in the family's chat template
    (:mod:`latent_core.prompts`, the builder training uses).

    ``texts`` replaces the :func:`build_prompt_text` user texts (other methods add their own instructions).
    Returns ``(inputs, prompt_length)``; text-only models (``causal_lm``) get the text alone.
    """
    from latent_core.prompts import encode_chats, render_prompts

    text_only = _family(model) == "causal_lm"
    texts = list(texts) if texts is not None else [build_prompt_text(s) for s in samples]
    per_sample = [[] if text_only else _images_of(s) for s in samples]
    chats = render_prompts(processor, texts, [len(images) for images in per_sample], text_only)
    inputs = encode_chats(processor, chats, None if text_only else per_sample, padding_side="left")
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


def control_texts(run: Callable[..., Any], runs: dict[str, dict[str, Any]], n: int) -> list[dict[str, str]]:
    """Per sample, the answer texts of the latent diagnostics' controls: ``run(**kwargs).texts`` for each
    ``name -> kwargs`` of ``runs`` (e.g. ``{"zero": {"latents": "zero"}}``), as ``[{name: text}]``."""
    controls: list[dict[str, str]] = [{} for _ in range(n)]
    for name, kwargs in runs.items():
        for row, text in zip(controls, run(**kwargs).texts, strict=True):
            row[name] = text
    return controls


def latent_generations(
    answers: Any,
    max_new_tokens: int,
    controls: Sequence[dict[str, str]],
    similarity: Sequence[float | None],
) -> list[Generation]:
    """:class:`Generation` records of a latent method's decoded ``answers`` (``texts``, ``token_counts`` without
    the end of turn, ``latent_steps``): generated tokens count the end of turn (capped at the budget), a count at the
    budget is ``truncated``, a ``nan`` similarity (a batch of one) is ``None``."""
    return [
        Generation(
            text=text,
            generated_tokens=min(count + 1, max_new_tokens),
            latent_steps=steps,
            truncated=count >= max_new_tokens,
            controls=control or None,
            latent_similarity=None if sim is None or sim != sim else float(sim),
        )
        for text, count, steps, control, sim in zip(
            answers.texts, answers.token_counts, answers.latent_steps, controls, similarity, strict=True
        )
    ]


class PlainMethod:
    """Batched greedy ``model.generate`` on the ``plain`` prompt (the baseline of every table)."""

    name = "plain"
    instruction: str | None = SHORT_INSTRUCTION
    staged = False
    default_max_new_tokens = 64

    def __call__(
        self, model: Any, processor: Any, samples: Sequence[dict[str, Any]], max_new_tokens: int
    ) -> list[Generation]:
        import torch

        tokenizer = getattr(processor, "tokenizer", processor)
        texts = [self.prompt_text(s) for s in samples]
        inputs, prompt_len = build_inputs(model, processor, samples, texts)
        inputs = inputs.to(model.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        eos_ids = eos_token_ids(model, processor)
        results = []
        for row in out[:, prompt_len:].cpu():
            n = count_generated(row, eos_ids)
            ended = n > 0 and int(row[n - 1]) in eos_ids
            text = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            results.append(self._generation(tokenizer, row[:n], text, ended))
        return results

    def prompt_text(self, sample: dict[str, Any]) -> str:
        """The user text ``sample`` is asked with."""
        return build_prompt_text(sample, self.instruction)

    def _generation(self, tokenizer: Any, kept: torch.Tensor, text: str, ended: bool) -> Generation:
        return Generation(text=text, generated_tokens=len(kept), truncated=not ended)


class DirectMethod(PlainMethod):
    """A base trained on a mixture of CoT and direct answers (``make-base --mix cot+direct``), asked for the final
    answer alone: the training prompt plus :data:`latent_core.prompts.DIRECT_INSTRUCTION` on its last line
    (:func:`latent_core.prompts.direct_prompt`), the answer read from the whole (short) output, and only from an
    output that ended within the budget (``complete_only``: a truncated one, a model that began to reason, is
    unanswered)."""

    name = "direct"
    instruction = None
    default_max_new_tokens = 32
    complete_only = True

    def prompt_text(self, sample: dict[str, Any]) -> str:
        from latent_core.prompts import direct_prompt

        return direct_prompt(build_prompt_text(sample, None))


class CotMethod(PlainMethod):
    """A model trained to answer with a staged chain of thought (LLaVA-CoT; Heima's stage 0; the shipped bases):
    greedy generation until EOS on the training prompt, the answer read from ``<CONCLUSION>`` only;
    ``reasoning_tokens`` are the tokens before the one where ``<CONCLUSION>`` starts."""

    name = "cot"
    instruction = None
    staged = True
    default_max_new_tokens = 1024

    def _generation(self, tokenizer: Any, kept: torch.Tensor, text: str, ended: bool) -> Generation:
        from latent_core.readers import reasoning_token_count

        body = kept.tolist()[:-1] if ended else kept.tolist()
        before = reasoning_token_count(tokenizer, body)
        return Generation(
            text=text,
            generated_tokens=len(kept),
            reasoning_tokens=before if before < len(body) else len(kept),
            truncated=not ended,
        )


class PartialMethod(CotMethod):
    """A base trained with short partial answers (``make-base --mix cot+direct+partial``) asked for one: the training
    prompt plus :data:`latent_core.prompts.PARTIAL_INSTRUCTION` on its last line
    (:func:`latent_core.prompts.partial_prompt`); the answer read from ``<CONCLUSION>`` as with ``cot``."""

    name = "partial"
    default_max_new_tokens = 160

    def prompt_text(self, sample: dict[str, Any]) -> str:
        from latent_core.prompts import partial_prompt

        return partial_prompt(build_prompt_text(sample, None))


register_method("plain", PlainMethod)
register_method("cot", CotMethod)
register_method("direct", DirectMethod)
register_method("partial", PartialMethod)

# Method adapters of the method packages register themselves on import.
from latent_apps.eval import coconut_method, heima_method, lare_method, lavit_method  # noqa: E402, F401  (their methods)
