"""Training data with the loss on answer tokens only, shared by router tuning and CEFT.

Each example becomes its prompt ids (``head``, no loss) and answer ids (``tail``: the loss positions, with
EOS when asked), cut from the left to ``max_length`` tokens. A run folder records the settings it was
started with; :func:`check_run_settings` refuses to continue it with other settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_interp.data.example import QAExample
from moe_interp.errors import InputError
from moe_interp.evaluation import split_continuation, write_json_atomic
from moe_interp.prompts import format_example


@dataclass
class AnswerLossExample:
    """One tokenised example: ``head`` prompt ids, ``tail`` answer ids (+ EOS), the loss positions."""

    head: list[int]
    tail: list[int]


def encode_answer_loss(
    tokenizer,
    examples: Sequence[QAExample],
    *,
    template: str = "paper",
    max_length: int = 300,
    append_eos: bool = True,
    what: str = "examples",
) -> list[AnswerLossExample]:
    """Tokenise ``examples`` (first gold answer as the target); ``what`` names the set in errors."""
    if max_length < 2:
        raise InputError(f"max_length must be >= 2 (one prompt and one answer token), got {max_length}")
    eos = tokenizer.eos_token_id if append_eos else None
    out = []
    for i, ex in enumerate(examples):
        if not ex.answers or not ex.answers[0].strip():
            raise InputError(f"{what}[{i}] (id {ex.id!r}) has no answer to train on")
        fp = format_example(ex, tokenizer, template=template, tokenize=False)
        head, tail = split_continuation(
            tokenizer, fp.text, fp.answer_prefix + ex.answers[0], add_special_tokens=fp.add_special_tokens
        )
        tail = tail + ([eos] if eos is not None else [])
        tail = tail[: max_length - 1]
        head = head[-(max_length - len(tail)) :]
        out.append(AnswerLossExample(head, tail))
    return out


def fingerprint(encoded: Sequence[AnswerLossExample]) -> str:
    """A short hash of the token ids (a resumed run must see the same data)."""
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.head, e.tail]).encode())
    return h.hexdigest()[:16]


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def check_run_settings(file: Path, meta: dict[str, Any], kind: str, *, write: bool = True) -> None:
    """Refuse a run folder whose ``file`` records other settings than ``meta``; write ``meta`` (atomically,
    if ``write``) when the folder is new. ``kind`` names the run in the error."""
    new = json.loads(json.dumps(meta))
    if file.exists():
        old = json.loads(file.read_text())
        if old != new:
            diff = []
            for k in sorted(new):
                if old.get(k) == new[k]:
                    continue
                if isinstance(new[k], dict) and isinstance(old.get(k), dict):  # name the inner setting
                    diff += [f"{k}.{i}" for i in sorted(new[k]) if old[k].get(i) != new[k][i]]
                else:
                    diff.append(k)
            raise InputError(
                f"{file.parent} holds a {kind} run with other settings (differs in {diff}); "
                "use another output folder"
            )
    elif write:
        write_json_atomic(file, meta)
