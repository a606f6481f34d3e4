"""The one prompt builder: the user turn every method trains on, generates with and is evaluated with.

Training (:class:`latent_core.collate.SupervisedCollator`), generation (``heima.generate``) and evaluation
(``latent eval``) all build their inputs here, so a model is always asked in the form it was trained with:

- :func:`question_text` writes the user text of a question with its options::

      [<hint>\\n]<question>
      Options:
      A. <option A>
      B. <option B>
      Please answer with the letter of the correct option.

  and a question without options as ``[<hint>\\n]<question>`` (plus ``instruction`` when given: the ``plain``
  evaluation of an untrained chat model adds :data:`SHORT_INSTRUCTION`). The synthetic shapes task writes its
  multiple-choice questions with this function, so its training data and its VLMEvalKit TSV ask the same thing.
- :func:`direct_prompt` adds :data:`DIRECT_INSTRUCTION` as the last line: the form in which a base trained on a
  mixture of CoT and direct answers (``make-base --mix cot+direct``) is asked for the final answer alone, and in
  which ``latent eval --method direct`` asks it. Without the line the same model writes its chain of thought.
- :func:`partial_prompt` adds :data:`PARTIAL_INSTRUCTION` the same way: the form in which a base trained with short
  partial answers (``make-base --mix cot+direct+partial``: the reasoning alone, an aggregating scan cut to one
  running count per row) is asked for them, and in which ``latent eval --method partial`` asks it.
- :func:`chat_messages` puts the images (first, as in LLaVA-CoT and the chat templates of every family) and the
  text in one user turn, optionally after a system turn (``system``: a method's own system prompt, e.g. LaViT's;
  without it the chat template writes its default, if it has one) and followed by the assistant's answer.
- :func:`decode_answers` cuts greedy answers at their end token and decodes them (LaViT's and LaRe's decoders).
- :func:`encode_chats` runs the processor on rendered chats with the family's image nesting (mllama takes one list
  of images per sample) and the padding side asked for (left for generation, right for training).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DIRECT_INSTRUCTION",
    "PARTIAL_INSTRUCTION",
    "MC_INSTRUCTION",
    "OPTIONS_HEADER",
    "SHORT_INSTRUCTION",
    "chat_messages",
    "decode_answers",
    "direct_prompt",
    "partial_prompt",
    "encode_chats",
    "parse_options",
    "question_text",
    "render_prompts",
]

OPTIONS_HEADER = "Options:"
MC_INSTRUCTION = "Please answer with the letter of the correct option."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
DIRECT_INSTRUCTION = "Answer directly, without reasoning."
PARTIAL_INSTRUCTION = "Answer with short reasoning."


def direct_prompt(text: str) -> str:
    """The user text ``text`` (a :func:`question_text`) asking for the final answer alone: ``text`` and
    :data:`DIRECT_INSTRUCTION` on a last line of its own (after the options and their instruction, if any)."""
    return f"{str(text).rstrip()}\n{DIRECT_INSTRUCTION}"


def partial_prompt(text: str) -> str:
    """The user text ``text`` asking for a short partial answer: ``text`` and :data:`PARTIAL_INSTRUCTION` on a last
    line of its own, as :func:`direct_prompt` does."""
    return f"{str(text).rstrip()}\n{PARTIAL_INSTRUCTION}"


def question_text(
    question: str,
    options: Mapping[str, Any] | Sequence[Any] | None = None,
    hint: str | None = None,
    instruction: str | None = None,
) -> str:
    """The user text of ``question`` (see the module docstring).

    Args:
        question: the bare question.
        options: letter -> option text, or a list of option texts (lettered A, B, ...); empty or ``None`` for an
            open question.
        hint: context written before the question (VLMEvalKit's ``hint`` column).
        instruction: a last line for open questions (multiple-choice questions always end with
            :data:`MC_INSTRUCTION`).
    """
    if options is not None and not isinstance(options, Mapping):
        options = {chr(ord("A") + i): value for i, value in enumerate(options)}
    lines = [str(hint).strip()] if hint else []
    lines.append(str(question).strip())
    if options:
        lines.append(OPTIONS_HEADER)
        lines.extend(f"{key}. {str(value).strip()}" for key, value in options.items())
        lines.append(MC_INSTRUCTION)
    elif instruction:
        lines.append(instruction)
    return "\n".join(lines)


def parse_options(text: str) -> dict[str, str]:
    """The options written in a user text by :func:`question_text` (``"A. red"`` lines after ``Options:``), as
    ``{letter: text}``; ``{}`` when it has none."""
    lines = text.split("\n")
    if OPTIONS_HEADER not in lines:
        return {}
    options = {}
    for line in lines[lines.index(OPTIONS_HEADER) + 1 :]:
        key, dot, value = line.partition(". ")
        if not dot or len(key) != 1 or not key.isalpha():
            break
        options[key] = value
    return options


def chat_messages(
    text: str, num_images: int = 1, answer: str | None = None, *, text_only: bool = False, system: str | None = None
) -> list:
    """One user turn holding ``num_images`` images then ``text``, and the assistant's ``answer`` when given.

    ``text_only`` (a text LLM's chat template) writes the user content as a plain string. ``system`` (a non-empty
    string) comes first as a system turn; ``None`` or ``""`` leaves the chat template's default.
    """
    if text_only or num_images == 0:
        content: Any = text if text_only else [{"type": "text", "text": text}]
    else:
        content = [*({"type": "image"} for _ in range(num_images)), {"type": "text", "text": text}]
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def render_prompts(
    processor: Any,
    texts: Sequence[str],
    num_images: Sequence[int],
    text_only: bool = False,
    *,
    system: str | None = None,
) -> list:
    """The chat-template strings of user turns ``texts`` with the generation prompt (what the model continues),
    after the system turn ``system`` when given (:func:`chat_messages`)."""
    apply = _tokenizer(processor).apply_chat_template
    return [
        apply(chat_messages(text, n, text_only=text_only, system=system), tokenize=False, add_generation_prompt=True)
        for text, n in zip(texts, num_images, strict=True)
    ]


def encode_chats(
    processor: Any,
    chats: Sequence[str],
    images: Sequence[Sequence[Any]] | None,
    padding_side: str = "left",
) -> Any:
    """Run ``processor`` on rendered ``chats`` (one list of PIL images per chat, or ``None`` for text only), padded
    on ``padding_side``. Mllama's processor takes the nested lists; the others one flat list in prompt order.

    Raises:
        ValueError: some chats have images and others not (batch them separately).
    """
    from latent_core.families import family_of_processor

    tokenizer = _tokenizer(processor)
    side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        kwargs: dict[str, Any] = dict(return_tensors="pt", padding=True, add_special_tokens=False)
        if images is None or not any(images):
            if hasattr(processor, "image_processor"):  # a VLM processor's first positional argument is images
                return processor(text=list(chats), **kwargs)
            return processor(list(chats), **kwargs)
        if not all(images):
            raise ValueError("a batch mixes samples with and without images; batch them separately")
        family = family_of_processor(processor)
        nested = family is not None and family.nested_images
        flat = [list(group) for group in images] if nested else [image for group in images for image in group]
        return processor(images=flat, text=list(chats), **kwargs)
    finally:
        tokenizer.padding_side = side


def decode_answers(processor: Any, model: Any, sequences: Any) -> tuple[list[str], list[int], list[list[int]]]:
    """Greedy answers ``sequences [B, T]`` (new tokens only) cut at their first end token - the tokenizer's eos or
    pad, or the generation config's eos (one id or a list) - as ``(texts, counts, rows)``: the decoded texts
    (special tokens skipped, stripped), the tokens before the end token, and those token ids."""
    tokenizer = _tokenizer(processor)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id, *(eos if isinstance(eos, list | tuple) else [eos])}
    rows = [list(row) for row in sequences.tolist()]
    counts = [next((i for i, token in enumerate(row) if token in ends), len(row)) for row in rows]
    rows = [row[:n] for row, n in zip(rows, counts, strict=True)]
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
    return texts, counts, rows
