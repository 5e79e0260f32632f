"""Character spans in text and their exact token spans.

A token belongs to a character span [a, b) when its character range [s, e) overlaps it (s < b and e > a).
Zero-width tokens (special tokens such as BOS) belong to no span.
"""

from __future__ import annotations

Span = tuple[int, int]


def find_all(text: str, needle: str, within: Span | None = None) -> list[Span]:
    """Every occurrence of ``needle`` in ``text[within]`` (overlapping ones too), as [start, end) char spans.

    >>> find_all("aXa aXa", "aXa")
    [(0, 3), (4, 7)]
    >>> find_all("aaa", "aa")
    [(0, 2), (1, 3)]
    """
    if not needle:
        return []
    lo, hi = within if within is not None else (0, len(text))
    found, start = [], text.find(needle, lo, hi)
    while start >= 0:
        found.append((start, start + len(needle)))
        start = text.find(needle, start + 1, hi)
    return found


def char_to_token_spans(offsets: list[Span], char_span: Span) -> list[Span]:
    """Token spans [start, end) covering ``char_span``, given each token's character offsets.

    Usually one span; several only if a zero-width token sits inside the character span.

    >>> char_to_token_spans([(0, 3), (3, 4), (4, 9)], (4, 9))
    [(2, 3)]
    """
    a, b = char_span
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
    spans: list[Span] = []
    for i in hits:
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def token_offsets(tokenizer, text: str) -> tuple[list[int], list[Span]]:
    """Token ids of ``text`` (with the tokenizer's special tokens) and each token's character offsets.

    Uses the fast tokenizer's offset mapping; otherwise decodes growing prefixes, which is exact for
    tokenizers whose decoding of a prefix is a prefix of the text.
    """
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        pass
    ids = list(tokenizer(text)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []))
    offsets: list[Span] = []
    prev = 0
    for i, tok in enumerate(ids):
        if tok in special:
            offsets.append((prev, prev))
            continue
        decoded = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        end = min(len(decoded), len(text))
        offsets.append((prev, max(end, prev)))
        prev = max(end, prev)
    return ids, offsets


def token_spans(
    tokenizer, text: str, char_spans: dict[str, list[Span]]
) -> tuple[list[int], dict[str, list[Span]]]:
    """Tokenise ``text`` and map each named list of character spans to token spans."""
    ids, offsets = token_offsets(tokenizer, text)
    out = {
        name: [t for span in spans for t in char_to_token_spans(offsets, span)]
        for name, spans in char_spans.items()
    }
    return ids, out
