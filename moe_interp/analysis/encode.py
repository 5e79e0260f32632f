"""Examples as token ids with exact spans, and right-padded batches of them.

Every analysis reads examples the same way: the prompt is :func:`moe_interp.prompts.format_example`'s text,
the gold answer is ``example.answers[0]`` (for the demo conflict splits: the context's object), appended
after the template's ``answer_prefix`` (teacher forcing). Spans are token index ranges ``[start, end)``:

- ``"context"``: the context inside the prompt;
- ``"answer"``: every occurrence of the gold answer inside the context.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_interp.data.example import QAExample
from moe_interp.errors import InputError
from moe_interp.evaluation import split_continuation
from moe_interp.prompts import format_example
from moe_interp.routerlens.data import to_examples

SPAN_NAMES = ("context", "answer")


@dataclass
class Encoded:
    """One example as tokens.

    Attributes:
        id: the example id. ids: prompt + answer token ids. prompt_len, answer_len: their lengths.
        spans: ``"context"`` / ``"answer"`` -> token spans ``[start, end)`` inside the prompt.
        tokens: the decoded text of each prompt token (for figures).
    """

    id: str
    ids: list[int]
    prompt_len: int
    answer_len: int
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)

    @property
    def answer_ids(self) -> list[int]:
        return self.ids[self.prompt_len :]


def as_examples(examples: Iterable[QAExample | Mapping[str, Any]]) -> Iterator[QAExample]:
    """QAExamples from QAExamples or dicts (demo split records), lazily."""
    for i, ex in enumerate(examples):
        if isinstance(ex, QAExample):
            yield ex
        elif isinstance(ex, Mapping):
            (out,) = to_examples([ex if "id" in ex else {**ex, "id": str(i)}])
            yield out
        else:
            raise InputError(f"example {i} is a {type(ex).__name__}, not a QAExample or dict")


def encode(
    tokenizer: Any,
    example: QAExample,
    *,
    template: str = "paper",
    tokens: bool = False,
    need_context: bool = True,
) -> Encoded:
    """Token ids and spans of ``example`` (see the module docstring); closed-book examples only where
    ``need_context`` is False (no attention spans then)."""
    if not example.answers:
        raise InputError(f"example {example.id!r} has no gold answer to score or locate")
    if example.context is None and need_context:
        raise InputError(f"example {example.id!r} has no context; attention analyses need one")
    fp = format_example(example, tokenizer, template=template)
    answer = example.answers[0]
    head, tail = split_continuation(
        tokenizer, fp.text, fp.answer_prefix + answer, add_special_tokens=fp.add_special_tokens
    )
    if list(fp.input_ids or ()) != head:
        raise InputError(f"example {example.id!r}: prompt ids disagree between format_example and scoring")
    if not tail:
        raise InputError(f"example {example.id!r}: answer {answer!r} encodes to no tokens")
    ctx = fp.context_tokens
    spans: dict[str, list[tuple[int, int]]] = {"context": [ctx] if ctx is not None else []}
    spans["answer"] = [s for s in fp.answer_tokens.get(answer, []) if s is not None]
    decoded = [tokenizer.decode([i]) for i in head] if tokens else []
    return Encoded(example.id, head + tail, len(head), len(tail), spans, decoded)


@dataclass
class Batch:
    """Right-padded batch.

    Attributes:
        items: the encoded examples. input_ids, mask: [B, T] (mask 1 = token).
        span_masks: [B, S, T] float, 1 inside span ``SPAN_NAMES[s]``.
    """

    items: list[Encoded]
    input_ids: torch.Tensor
    mask: torch.Tensor
    span_masks: torch.Tensor

    @property
    def last(self) -> torch.Tensor:
        """[B] position of each prompt's last token."""
        return torch.tensor([e.prompt_len - 1 for e in self.items])


def make_batch(items: Sequence[Encoded], pad_id: int, *, with_answer: bool = True) -> Batch:
    """Right-pad ``items`` (prompt + answer, or the prompt only) into a :class:`Batch`."""
    seqs = [e.ids if with_answer else e.ids[: e.prompt_len] for e in items]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    spans = torch.zeros(len(seqs), len(SPAN_NAMES), width)
    for b, (e, s) in enumerate(zip(items, seqs, strict=True)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        for k, name in enumerate(SPAN_NAMES):
            for start, end in e.spans.get(name, []):
                spans[b, k, start:end] = 1.0
    return Batch(list(items), ids, mask, spans)


def pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def batches(
    tokenizer: Any,
    examples: Iterable[QAExample | Mapping[str, Any]],
    batch_size: int,
    *,
    template: str = "paper",
    with_answer: bool = True,
    need_context: bool = True,
) -> Iterator[Batch]:
    """Stream :class:`Batch` es of ``batch_size`` examples (only one batch is held at a time)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    pid, chunk = pad_id(tokenizer), []
    for ex in as_examples(examples):
        chunk.append(encode(tokenizer, ex, template=template, need_context=need_context))
        if len(chunk) == batch_size:
            yield make_batch(chunk, pid, with_answer=with_answer)
            chunk = []
    if chunk:
        yield make_batch(chunk, pid, with_answer=with_answer)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
