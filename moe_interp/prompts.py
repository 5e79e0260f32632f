"""Prompt formats for context-faithfulness experiments.

The context template is the user turn of Bai et al. (EMNLP 2025, Router Lens / CEFT). Models without a
chat template (such as the embedded demo model) get a plain answer cue appended; the answer follows the
cue after a single space, e.g. ``build_prompt(ctx, q) + " Paris"``.

Closed-book prompts (no context) keep the same question/answer framing without the instruction::

    Question:
    {question}

    Answer:
"""

from __future__ import annotations

import string
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moe_interp.data.spans import (
    CaseMode,
    CharSpan,
    TokenSpan,
    char_to_token_spans,
    encode_with_offsets,
    find_answer_spans,
    offsets_from_decoding,
)
from moe_interp.errors import InputError

if TYPE_CHECKING:
    from moe_interp.data.example import QAExample

#: The paper's user turn (Router Lens / CEFT code), with ``{context}`` and ``{question}`` slots.
CONTEXT_TEMPLATE = (
    "Based on the context below, output the correct answer for the following question."
    "\n\nContext:\n{context}\n\nQuestion:\n{question}"
)
#: Closed-book variant of the user turn: the question part of :data:`CONTEXT_TEMPLATE` only.
CLOSED_BOOK_TEMPLATE = "Question:\n{question}"
#: Plain answer cue appended for models without a chat template; the answer follows after one space.
ANSWER_CUE = "\n\nAnswer:"


def build_prompt(context: str | None, question: str) -> str:
    """Return the full prompt for ``question``, with ``context`` if given, ending in :data:`ANSWER_CUE`.

    ``context=None`` gives the closed-book format. An empty string is treated as a (blank) context.
    """
    if context is None:
        body = CLOSED_BOOK_TEMPLATE.format(question=question)
    else:
        body = CONTEXT_TEMPLATE.format(context=context, question=question)
    return body + ANSWER_CUE


# --- formatted examples with spans ----------------------------------------------------------------

#: Template names understood by :func:`format_example`; any other string is a custom format string.
TEMPLATE_NAMES = ("paper", "chat")
_FIELDS = ("context", "question")


def _render(template: str, values: dict[str, str | None], what: str) -> tuple[str, dict[str, CharSpan]]:
    """Fill ``{context}`` / ``{question}`` in ``template`` and return the text and each field's first span."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise InputError(f"{what}: malformed format string {template!r}: {err}") from None
    pieces: list[str] = []
    spans: dict[str, CharSpan] = {}
    pos = 0
    for literal, field, spec, conversion in parts:
        pieces.append(literal)
        pos += len(literal)
        if field is None:
            continue
        if field not in _FIELDS or spec or conversion:
            raise InputError(
                f"{what}: unsupported field {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} in {template!r}; "
                "only {context} and {question} are allowed"
            )
        value = values[field]
        if value is None:
            raise InputError(f"{what}: template {template!r} has a {{{field}}} slot but the example has none")
        spans.setdefault(field, (pos, pos + len(value)))
        pieces.append(value)
        pos += len(value)
    return "".join(pieces), spans


def _shift(span: CharSpan, by: int) -> CharSpan:
    return (span[0] + by, span[1] + by)


def _adds_specials(tokenizer: Any, text: str, add_special_tokens: bool) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return add_special_tokens and not (bos and text.startswith(bos))


def _trailing_specials(tokenizer: Any) -> tuple[int | None, frozenset[int]]:
    """How many special tokens the tokenizer appends after a text's own tokens (an EOS: 1; most: 0), read
    once per tokenizer from a probe (``None`` if the probe's tokens are not found inside its encoding), and
    the tokenizer's special ids."""
    try:
        return _TRAILING[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = "The capital of France is"
    full = list(tokenizer(probe)["input_ids"])
    core = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    found = [s for s in range(len(full) - len(core) + 1) if full[s : s + len(core)] == core]
    count = len(full) - found[0] - len(core) if core and found else None
    out = (count, frozenset(getattr(tokenizer, "all_special_ids", None) or ()))
    try:
        _TRAILING[tokenizer] = out
    except TypeError:  # not weak-referenceable: not cached
        pass
    return out


_TRAILING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kept_length(tokenizer: Any, text: str, ids: list[int]) -> int:
    """Length of ``ids`` (encoded with special tokens) up to the end of the text's own tokens."""
    trailing, specials = _trailing_specials(tokenizer)
    if trailing is not None and len(ids) > trailing:
        keep = len(ids) - trailing  # special tokens come from a fixed template around the text ...
        if ids[keep - 1] not in specials and all(i in specials for i in ids[keep:]):
            return keep  # ... as this encoding confirms; otherwise find the text's tokens below
    core = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for start in range(len(ids) - len(core) + 1):
        if ids[start : start + len(core)] == core:
            return start + len(core)
    return len(ids)


def prompt_ids(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt, with the special-token policy of :func:`encode_prompt` (no offsets)."""
    add = _adds_specials(tokenizer, text, add_special_tokens)
    ids = list(tokenizer(text, add_special_tokens=add)["input_ids"])
    return ids[: _kept_length(tokenizer, text, ids)] if add else ids


def encode_prompt(
    tokenizer: Any, text: str, *, add_special_tokens: bool = True
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a prompt and each token's character offsets into ``text``.

    With ``add_special_tokens`` the tokenizer's *leading* special tokens (BOS) are kept and trailing ones
    (an EOS some tokenizers append) dropped: a prompt must not end in EOS. No BOS is added when ``text``
    already starts with the BOS string (chat templates often render it). Special tokens get ``(0, 0)``.
    Offsets come from :func:`~moe_interp.data.spans.encode_with_offsets` (fast tokenizers' offset
    mapping, else :func:`~moe_interp.data.offsets_from_decoding`).
    """
    if _adds_specials(tokenizer, text, add_special_tokens):
        ids, offsets = encode_with_offsets(tokenizer, text)
        keep = _kept_length(tokenizer, text, ids)
        return ids[:keep], offsets[:keep]
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids, offsets_from_decoding(tokenizer, ids, text)


@dataclass(frozen=True)
class FormattedPrompt:
    """A prompt string with the character spans (half-open, prompt coordinates) of its parts.

    Attributes:
        text: The prompt. The answer follows it after ``answer_prefix`` (``text + answer_prefix + answer``).
        context: Span of the context, ``None`` for closed-book prompts.
        question: Span of the question.
        answers: Each gold answer -> spans of all its occurrences inside the context (empty if absent;
            matching as :func:`~moe_interp.data.find_answer_spans`, per answer).
        answer_prefix: ``" "`` after a plain answer cue, ``""`` after a chat template's generation prompt.
        add_special_tokens: Whether the tokenizer should add its special tokens (BOS) when encoding ``text``
            (``False`` for chat templates, which render their own).
        input_ids: Token ids of ``text`` (see :func:`encode_prompt`); ``None`` unless tokenised.
        offsets: ``[T]`` character ``(start, end)`` per token; ``None`` unless tokenised.
    """

    text: str
    context: CharSpan | None
    question: CharSpan
    answers: dict[str, tuple[CharSpan, ...]]
    answer_prefix: str = " "
    add_special_tokens: bool = True
    input_ids: tuple[int, ...] | None = None
    offsets: tuple[tuple[int, int], ...] | None = None

    @property
    def answer_in_context(self) -> bool:
        """Whether any gold answer occurs in the context."""
        return any(self.answers.values())

    @property
    def answer_spans(self) -> list[CharSpan]:
        """All answer spans of all answers, sorted and de-duplicated."""
        return sorted({s for spans in self.answers.values() for s in spans})

    def token_spans(self, spans: Sequence[CharSpan]) -> list[TokenSpan | None]:
        """Map character spans of :attr:`text` to token spans ``[start, end)`` of :attr:`input_ids`."""
        if self.offsets is None:
            raise InputError("this prompt was not tokenised; call format_example(..., tokenizer=tok)")
        return char_to_token_spans(self.offsets, spans)

    @property
    def context_tokens(self) -> TokenSpan | None:
        """Token span of the context (``None`` for closed-book prompts)."""
        return None if self.context is None else self.token_spans([self.context])[0]

    @property
    def question_tokens(self) -> TokenSpan | None:
        """Token span of the question."""
        return self.token_spans([self.question])[0]

    @property
    def answer_tokens(self) -> dict[str, list[TokenSpan | None]]:
        """Each gold answer -> token spans of its occurrences in the context."""
        return {a: self.token_spans(list(s)) for a, s in self.answers.items()}


def _user_turn(example: QAExample, what: str) -> tuple[str, dict[str, CharSpan]]:
    if example.context is None:
        return _render(CLOSED_BOOK_TEMPLATE, {"question": example.question, "context": None}, what)
    return _render(CONTEXT_TEMPLATE, {"question": example.question, "context": example.context}, what)


def _chat(tokenizer: Any, user: str, what: str) -> tuple[str, int]:
    """The chat-formatted prompt and the offset of the user turn in it."""
    if tokenizer is None:
        raise InputError(f"{what}: template='chat' needs a tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{what}: tokenizer {type(tokenizer).__name__} has no chat template; use template='paper' "
            "(plain answer cue) or a custom format string"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
    )
    where = text.find(user)
    if where < 0:
        raise InputError(f"{what}: the chat template altered the user turn; cannot locate the context in it")
    return text, where


def format_example(
    example: QAExample,
    tokenizer: Any = None,
    *,
    template: str = "paper",
    tokenize: bool | None = None,
    case: CaseMode = "fallback",
    whole_word: bool = False,
) -> FormattedPrompt:
    """Format ``example`` as a prompt and locate its context, question and gold answers in it.

    Args:
        template: ``"paper"``: :func:`build_prompt` (user turn + plain answer cue; answer after one space).
            ``"chat"``: the paper's user turn through ``tokenizer.apply_chat_template`` with the generation
            prompt (needs a tokenizer with a chat template). Any other string: a custom format string with
            ``{context}`` and/or ``{question}`` used as the whole prompt (include your own answer cue).
        tokenize: Also compute ``input_ids`` / ``offsets`` (enables the token-span accessors);
            default: whenever a tokenizer is given.
        case, whole_word: Answer matching in the context (see :func:`~moe_interp.data.find_answer_spans`).

    Raises:
        InputError: unknown field in a custom template, a ``{context}`` slot for a closed-book example,
            ``"chat"`` without a (chat-template) tokenizer.
    """
    what = f"example {example.id!r}"
    if template == "paper":
        body, spans = _user_turn(example, what)
        text, offset, prefix, specials = body + ANSWER_CUE, 0, " ", True
    elif template == "chat":
        body, spans = _user_turn(example, what)
        text, offset = _chat(tokenizer, body, what)
        prefix, specials = "", False
    else:
        values = {"context": example.context, "question": example.question}
        text, spans = _render(template, values, what)
        offset, specials = 0, True
        prefix = "" if not text or text[-1].isspace() else " "
    if "question" not in spans:
        raise InputError(f"{what}: template {template!r} has no {{question}} slot")
    ctx = _shift(spans["context"], offset) if "context" in spans else None
    answers: dict[str, tuple[CharSpan, ...]] = {}
    for answer in example.answers:
        if ctx is None or example.context is None:
            answers[answer] = ()
            continue
        found = find_answer_spans(example.context, answer, case=case, whole_word=whole_word)
        answers[answer] = tuple(_shift(s, ctx[0]) for s in found)
    ids = offsets = None
    if tokenize or (tokenize is None and tokenizer is not None):
        if tokenizer is None:
            raise InputError(f"{what}: tokenize=True needs a tokenizer")
        ids_l, offs_l = encode_prompt(tokenizer, text, add_special_tokens=specials)
        ids, offsets = tuple(ids_l), tuple(offs_l)
    return FormattedPrompt(
        text=text,
        context=ctx,
        question=_shift(spans["question"], offset),
        answers=answers,
        answer_prefix=prefix,
        add_special_tokens=specials,
        input_ids=ids,
        offsets=offsets,
    )


__all__ = [
    "ANSWER_CUE",
    "CLOSED_BOOK_TEMPLATE",
    "CONTEXT_TEMPLATE",
    "TEMPLATE_NAMES",
    "FormattedPrompt",
    "build_prompt",
    "encode_prompt",
    "format_example",
    "prompt_ids",
]
