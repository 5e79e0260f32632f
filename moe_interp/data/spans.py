"""Answer spans: characters in a context, and the tokens that cover them.

All spans are half-open ``(start, end)`` (Python slice convention): characters ``text[start:end]``,
tokens ``ids[start:end]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from moe_interp.errors import InputError

CharSpan = tuple[int, int]
TokenSpan = tuple[int, int]
CaseMode = Literal["sensitive", "fallback", "insensitive"]

_REPLACEMENT = "\ufffd"


def _pattern(answer: str, whole_word: bool) -> str:
    body = re.escape(answer)
    if whole_word:
        # Only constrain the edges that are word characters ("U.S." may be followed by a letter).
        if re.match(r"\w", answer[0]):
            body = r"(?<!\w)" + body
        if re.match(r"\w", answer[-1]):
            body = body + r"(?!\w)"
    return f"(?=({body}))"  # look-ahead: finds overlapping occurrences too


def _find(context: str, answers: list[str], flags: int, whole_word: bool) -> set[CharSpan]:
    spans: set[CharSpan] = set()
    for answer in answers:
        for m in re.finditer(_pattern(answer, whole_word), context, flags):
            spans.add(m.span(1))
    return spans


def find_answer_spans(
    context: str,
    answers: str | Iterable[str],
    *,
    case: CaseMode = "fallback",
    whole_word: bool = False,
) -> list[CharSpan]:
    """Character spans of every occurrence of every answer in ``context``, sorted and de-duplicated.

    Occurrences may overlap (``"aa"`` in ``"aaa"`` -> ``[(0, 2), (1, 3)]``), and spans of different
    answers may nest (``"Paris"`` inside ``"Paris, France"``). Empty answers are ignored.
    Matching is literal on the raw strings (no Unicode or whitespace normalisation).

    Args:
        case: ``"sensitive"``: exact matches only. ``"fallback"`` (default): exact matches; only if no
            answer occurs exactly, case-insensitive matches (``re.IGNORECASE``, offsets stay those of
            ``context``). ``"insensitive"``: always case-insensitive.
        whole_word: Reject matches glued to a word character on an edge where the answer itself starts/ends
            with a word character (``"1"`` does not match inside ``"1988"``).
    """
    golds = [answers] if isinstance(answers, str) else [a for a in answers]
    golds = [a for a in dict.fromkeys(golds) if a]
    if case not in ("sensitive", "fallback", "insensitive"):
        raise InputError(f"unknown case mode {case!r}; expected 'sensitive', 'fallback' or 'insensitive'")
    spans: set[CharSpan] = set()
    if case != "insensitive":
        spans = _find(context, golds, 0, whole_word)
    if case == "insensitive" or (case == "fallback" and not spans):
        spans = _find(context, golds, re.IGNORECASE, whole_word)
    return sorted(spans)


def _as_array(offsets: Any) -> np.ndarray:
    """``offsets`` (a list of (start, end) pairs, or a [T, 2] tensor / array) as a [T, 2] int64 array."""
    if hasattr(offsets, "detach"):  # torch
        offsets = offsets.detach().cpu().numpy()
    try:  # numpy infers an integer dtype only if every entry is an int (floats, strings: refused below)
        array = np.asarray(offsets) if len(offsets) else np.zeros((0, 2), dtype=np.int64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 2 or array.shape[-1] != 2 or not np.issubdtype(array.dtype, np.integer):
        shown = offsets if array is None else f"of shape {tuple(array.shape)} and dtype {array.dtype}"
        raise InputError(
            f"offsets {str(shown)[:80]} are not (start, end) pairs; pass the offsets of ONE sequence "
            "(e.g. enc['offset_mapping'][0])"
        )
    return array.astype(np.int64, copy=False)


def char_to_token_spans(
    offsets: Sequence[tuple[int, int]] | Any, char_spans: Iterable[CharSpan]
) -> list[TokenSpan | None]:
    """Map character spans to token spans ``[start, end)`` using a tokenizer's offset mapping.

    A token belongs to a span iff its character range overlaps it (``tok_start < end and start < tok_end``),
    so a token only partly inside the span (e.g. ``" Paris"`` -> ``"Paris"``, or a BPE piece shared
    with a neighbour) is included. Zero-width tokens (special tokens with ``(0, 0)``) never overlap.
    The result is ``(first, last + 1)`` of the overlapping tokens, or ``None`` when no token overlaps
    (the span fell outside the tokenised text, e.g. truncated, or only on characters no token covers).

    Args:
        offsets: ``(start, end)`` character offsets per token for the same string the char spans index
            (a list of pairs, or a ``[T, 2]`` tensor / array), as returned by
            ``tokenizer(text, return_offsets_mapping=True)["offset_mapping"]`` or
            :func:`offsets_from_decoding`.
        char_spans: Non-empty half-open character spans.
    """
    spans = list(char_spans)
    for span in spans:
        start, end = span
        if not 0 <= start < end:
            raise InputError(f"invalid character span {span!r}: need 0 <= start < end")
    pairs = _as_array(offsets)
    if not spans:
        return []
    tok_start, tok_end = pairs[:, 0], pairs[:, 1]  # [T]
    bounds = np.asarray(spans, dtype=np.int64)  # [S, 2]
    # [S, T]: token t overlaps span s (one vectorised test instead of a Python scan per span)
    hit = (tok_start[None] < bounds[:, 1:]) & (bounds[:, :1] < tok_end[None]) & (tok_start < tok_end)[None]
    any_hit = hit.any(1).tolist()
    first = hit.argmax(1).tolist()
    last = (hit.shape[1] - 1 - hit[:, ::-1].argmax(1)).tolist()
    return [(f, e + 1) if h else None for h, f, e in zip(any_hit, first, last, strict=True)]


class _Decoder(Protocol):
    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...


def offsets_from_decoding(
    tokenizer: _Decoder, input_ids: Sequence[int] | Any, text: str | None = None
) -> list[tuple[int, int]]:
    """Character offsets per token for tokenizers without an offset mapping (slow tokenizers).

    Decodes every prefix ``input_ids[:i + 1]`` (``skip_special_tokens=True``, no clean-up of spaces):
    token ``i`` covers the characters its prefix adds. Special tokens add nothing -> ``(p, p)``.
    Byte pieces of one multi-byte character (the prefix then ends in U+FFFD; byte-level BPE and Llama-style
    byte-fallback both handled) all get that character's range, as fast tokenizers' offsets do.
    A token's range includes any space it decodes to (``" Paris"`` -> 6 chars), unlike
    fast tokenizers with ``trim_offsets``; overlap-based :func:`char_to_token_spans` gives the same
    token spans either way except for spans that begin or end on such a space.

    Cost: ``len(input_ids)`` decodes of growing prefixes (quadratic; fine for a few thousand tokens).

    Args:
        tokenizer: Anything with ``decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=...)``.
        input_ids: The token ids (one sequence).
        text: The string the ids encode; default: the decode of all ids. Offsets index this string.

    Raises:
        InputError: a decoded prefix is not a prefix of ``text`` (decoding is lossy for this tokenizer:
            normalisation, added prefix space, ...); map spans against ``text=None`` instead.
    """
    ids = [int(i) for i in (input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids)]

    def decode(upto: int) -> str:
        return tokenizer.decode(ids[:upto], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def decode_one(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    reference = decode(len(ids)) if text is None else text
    offsets: list[tuple[int, int]] = []
    committed = 0  # characters completely produced by the tokens so far
    previous = ""
    for i in range(len(ids)):
        decoded = decode(i + 1)
        if decoded == previous and not decode_one(ids[i]):  # special / empty token: zero width
            offsets.append((committed, committed))
            continue
        if not reference.startswith(decoded):
            # The prefix ends inside a multi-byte character: it decodes to <clean text> + U+FFFD...
            # (byte-level BPE: one U+FFFD; byte-fallback may turn the whole pending byte run into U+FFFDs).
            stripped = decoded.rstrip(_REPLACEMENT)
            if stripped == decoded or not reference.startswith(stripped):
                raise InputError(
                    f"decoded prefix of {i + 1} tokens (...{decoded[-40:]!r}) is not a prefix of the text; "
                    "decoding is lossy here (use a fast tokenizer's offset mapping or text=None)"
                )
            # The token's first byte lands in character `committed`; it also touches the incomplete one.
            end = max(committed, len(stripped))
            offsets.append((committed, end + 1))
            committed, previous = end, decoded
            continue
        if len(decoded) < committed:
            raise InputError(f"decoded prefix of {i + 1} tokens is shorter than that of {i} tokens")
        offsets.append((committed, len(decoded)))
        committed, previous = len(decoded), decoded
    return offsets


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (with the tokenizer's special tokens) and each token's character offsets.

    Uses a fast tokenizer's offset mapping; otherwise :func:`offsets_from_decoding`.
    """
    return encode_many_with_offsets(tokenizer, [text])[0]


def encode_many_with_offsets(
    tokenizer: Any, texts: list[str]
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """:func:`encode_with_offsets` for each of ``texts``, in one tokenizer call where the tokenizer can."""
    try:
        enc = tokenizer(texts, return_offsets_mapping=True)
        return [
            (list(ids), [tuple(o) for o in offs])
            for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        out = []
        for text in texts:
            ids = list(tokenizer(text)["input_ids"])
            out.append((ids, offsets_from_decoding(tokenizer, ids, text)))
        return out
