"""Generic streaming record reader (JSON / JSONL / CSV, optionally gzipped) and field-mapped loading.

Memory: JSON Lines and CSV are streamed line by line (constant memory however many lines).
A JSON document is parsed whole (``json.load``), so a big JSON array costs its full size in memory;
convert such files to JSON Lines if that matters.

Every failure on bad input is a :class:`~moe_interp.errors.DataError` whose message names the file,
and, where it applies, the record (``line N`` for JSONL/CSV, ``record N`` = 0-based array index
for JSON) and the field.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal

from moe_interp.data.example import QAExample
from moe_interp.errors import DataError

Format = Literal["json", "jsonl", "csv"]
FORMATS: tuple[str, ...] = ("json", "jsonl", "csv")
_SUFFIX_FORMAT = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_GZIP_MAGIC = b"\x1f\x8b"
_MISSING = object()

#: Fields a :func:`load_examples` mapping may name (``question`` and ``answers`` are required).
EXAMPLE_FIELDS: tuple[str, ...] = (
    "id",
    "context",
    "question",
    "answers",
    "memorised_answer",
    "counterfactual_answer",
)
DEFAULT_FIELDS: dict[str, str] = {"context": "context", "question": "question", "answers": "answers"}


def detect_format(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """Return ``(format, gzipped)`` from the file name, e.g. ``data.jsonl.gz`` -> ``("jsonl", True)``."""
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    fmt = _SUFFIX_FORMAT.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise DataError(
            f"{p}: cannot tell the format from the file name; pass format= one of {', '.join(FORMATS)}"
        )
    return fmt, gz


def _open_text(path: Path) -> IO[str]:
    """Open as UTF-8 text (strict), transparently gunzipping when the bytes say gzip."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(2)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file") from None
    if magic == _GZIP_MAGIC:
        raw: IO[bytes] = gzip.open(path, "rb")
    else:
        if path.suffix.lower() == ".gz":
            raise DataError(f"{path}: named .gz but is not gzip-compressed")
        raw = path.open("rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _decode_error(path: Path, where: str, exc: BaseException) -> DataError:
    if isinstance(exc, UnicodeDecodeError):
        return DataError(f"{path}: {where}: not valid UTF-8 text ({exc.reason} at byte {exc.start})")
    return DataError(f"{path}: {where}: corrupt gzip stream ({exc})")


_STREAM_ERRORS = (UnicodeDecodeError, EOFError, zlib.error, gzip.BadGzipFile)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    lineno = 0
    with _open_text(path) as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    hint = " (is it a JSON document? use format='json')" if lineno == 1 else ""
                    raise DataError(f"{path}: line {lineno}: not valid JSON Lines: {exc.msg}{hint}") from None
                yield f"line {lineno}", value
        except _STREAM_ERRORS as exc:
            raise _decode_error(path, f"line {lineno + 1}", exc) from None


def _get_path(obj: Any, dotted: str) -> Any:
    """Follow a dotted path (``"a.b.0.c"``; integers index lists); return ``_MISSING`` if absent."""
    cur = obj
    for part in dotted.split("."):
        if isinstance(cur, Mapping):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit():
            idx = int(part)
            if not -len(cur) <= idx < len(cur):
                return _MISSING
            cur = cur[idx]
        else:
            return _MISSING
    return cur


def _iter_json(path: Path, root: str | None) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as fh:
        try:
            text = fh.read()
        except _STREAM_ERRORS as exc:
            raise _decode_error(path, "reading", exc) from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (is it JSON Lines? use format='jsonl')" if exc.msg == "Extra data" else ""
        raise DataError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}{hint}"
        ) from None
    if root is not None:
        doc = _get_path(doc, root)
        if doc is _MISSING:
            raise DataError(f"{path}: root path {root!r} not found in the JSON document")
    if not isinstance(doc, list):
        where = f"at root path {root!r}" if root else "at the top level"
        raise DataError(
            f"{path}: expected a JSON array of records {where}, found {type(doc).__name__}"
            + ("" if root else "; pass root='dotted.path' to the array")
        )
    for i, value in enumerate(doc):
        yield f"record {i}", value


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    # Long passages exceed csv's default 128 KiB field limit; raise it (process-global, only upwards).
    limit = min(sys.maxsize, 2**31 - 1)
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                return
            if len(set(header)) != len(header) or any(not h for h in header):
                raise DataError(f"{path}: line 1: CSV header has empty or duplicate column names: {header}")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}: line {reader.line_num}: {len(row)} CSV fields, header has {len(header)}"
                    )
                yield f"line {reader.line_num}", dict(zip(header, row, strict=True))
        except csv.Error as exc:
            raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
        except _STREAM_ERRORS as exc:
            raise _decode_error(path, f"line {reader.line_num + 1}", exc) from None


def iter_located_records(
    path: str | os.PathLike[str], *, format: Format | None = None, root: str | None = None
) -> Iterator[tuple[str, Any]]:
    """Like :func:`read_records` but yield ``(location, record)``, location e.g. ``"line 7"``."""
    p = Path(path)
    if format is None:
        format = detect_format(p)[0]  # type: ignore[assignment]
    elif format not in FORMATS:
        raise DataError(f"{p}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if root is not None and format != "json":
        raise DataError(f"{p}: root= only applies to JSON documents, not {format}")
    if format == "json":
        records = _iter_json(p, root)
    elif format == "jsonl":
        records = _iter_jsonl(p)
    else:
        records = _iter_csv(p)
    empty = True
    for item in records:
        empty = False
        yield item
    if empty:
        raise DataError(f"{p}: empty file (contains no records)")


def read_records(
    path: str | os.PathLike[str], *, format: Format | None = None, root: str | None = None
) -> Iterator[Any]:
    """Stream the records of a JSON / JSONL / CSV file (each optionally ``.gz``).

    Args:
        path: The file. Gzip is recognised by its magic bytes (a ``.gz`` name that is not gzip fails).
        format: ``"json"`` (a document holding an array), ``"jsonl"`` or ``"csv"`` (header row;
            records are ``dict[str, str]``). Default: from the suffix (``.json``, ``.jsonl``/``.ndjson``,
            ``.csv``, each optionally followed by ``.gz``).
        root: JSON only: dotted path to the array inside the document (e.g. ``"0.rows"``).

    Raises:
        DataError: unknown format, missing file, invalid UTF-8, corrupt gzip, syntax errors,
            ragged CSV rows, or a file with no records at all (all name the file and location).
    """
    for _, record in iter_located_records(path, format=format, root=root):
        yield record


def _as_text(value: Any, where: str, field: str, *, allow_none: bool) -> str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")


def _as_answers(value: Any, where: str, field: str, sep: str | None) -> tuple[str, ...]:
    if isinstance(value, str):
        parts = value.split(sep) if sep is not None else [value]
        return tuple(p.strip() if sep is not None else p for p in parts)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (str(value),)
    if isinstance(value, (list, tuple)):
        return tuple(_as_text(v, where, f"{field}[{i}]", allow_none=False) for i, v in enumerate(value))  # type: ignore[misc]
    raise DataError(
        f"{where}: field {field!r} must be a string or a list of strings, got {type(value).__name__}"
    )


def iter_examples(
    path: str | os.PathLike[str],
    fields: Mapping[str, str] = DEFAULT_FIELDS,
    *,
    format: Format | None = None,
    root: str | None = None,
    source: str | None = None,
    answer_sep: str | None = None,
    limit: int | None = None,
) -> Iterator[QAExample]:
    """Stream :class:`QAExample` s from a file, mapping example fields to (dotted) record paths.

    Args:
        path, format, root: As in :func:`read_records`.
        fields: ``{example field: record path}``; keys from :data:`EXAMPLE_FIELDS`, ``question`` and
            ``answers`` required. Paths are dotted (``"answer.aliases"``, ``"ctxs.0.text"``).
            Without ``id`` the id is ``"<file stem>/<record number>"``; without ``context`` the
            examples are closed-book.
        source: Value of :attr:`QAExample.source` (default: the path).
        answer_sep: If set, a string answers value is split on it (e.g. ``"|"`` for CSV).
        limit: Stop after this many examples.

    Raises:
        DataError: a record lacks a mapped field or has the wrong type (names file, record, field),
            plus everything :func:`read_records` raises.
    """
    unknown = set(fields) - set(EXAMPLE_FIELDS)
    missing = {"question", "answers"} - set(fields)
    if unknown or missing:
        raise DataError(
            f"bad field mapping: unknown {sorted(unknown)}, missing {sorted(missing)}; "
            f"valid keys: {', '.join(EXAMPLE_FIELDS)}"
        )
    p = Path(path)
    src = source if source is not None else str(p)
    stem = p.name.split(".")[0]
    for n, (loc, record) in enumerate(iter_located_records(p, format=format, root=root)):
        if limit is not None and n >= limit:
            return
        where = f"{p}: {loc}"
        values: dict[str, Any] = {}
        for key, rec_path in fields.items():
            value = _get_path(record, rec_path)
            if value is _MISSING:
                raise DataError(f"{where}: missing field {rec_path!r} (for {key})")
            values[key] = value
        yield QAExample(
            id=_as_text(values["id"], where, fields["id"], allow_none=False)  # type: ignore[arg-type]
            if "id" in values
            else f"{stem}/{n}",
            context=_as_text(values.get("context"), where, fields.get("context", ""), allow_none=True),
            question=_as_text(values["question"], where, fields["question"], allow_none=False),  # type: ignore[arg-type]
            answers=_as_answers(values["answers"], where, fields["answers"], answer_sep),
            memorised_answer=_as_text(
                values.get("memorised_answer"), where, fields.get("memorised_answer", ""), allow_none=True
            ),
            counterfactual_answer=_as_text(
                values.get("counterfactual_answer"),
                where,
                fields.get("counterfactual_answer", ""),
                allow_none=True,
            ),
            source=src,
        )


def load_examples(
    path: str | os.PathLike[str],
    fields: Mapping[str, str] = DEFAULT_FIELDS,
    *,
    format: Format | None = None,
    root: str | None = None,
    source: str | None = None,
    answer_sep: str | None = None,
    limit: int | None = None,
) -> list[QAExample]:
    """List version of :func:`iter_examples` (same arguments)."""
    return list(
        iter_examples(
            path, fields, format=format, root=root, source=source, answer_sep=answer_sep, limit=limit
        )
    )
