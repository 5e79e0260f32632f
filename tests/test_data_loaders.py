"""Data set loaders (real files under ../shared/data) and the generic record reader's error handling."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from moe_interp.data.loaders import DATA_ENV_VAR, data_root, default_data_root, list_datasets, load_dataset
from moe_interp.data.records import iter_examples, load_examples, read_records
from moe_interp.errors import DataError, MoEInterpError

REPO = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(
    not default_data_root().is_dir(), reason=f"shared data folder {default_data_root()} is missing"
)

# Record counts from each folder's SOURCE.txt / the data README.
COUNTS = [
    ("nq-swap", "train", 3000),
    ("nq-swap", "dev", 746),
    ("nq-swap", "test", 1000),
    ("confiqa-mc", "dev", 500),
    ("confiqa-mc", "test", 1500),
    ("squad", "dev", 4330),
    ("counterfact", "edit", 10000),
    ("counterfact", "val", 1919),
    ("counterfact", "edit-1k", 1000),
    ("counterfact", "evidence-1k", 1000),
    ("nq-open-oracle", "dev", 2655),
    ("nq-open", "dev", 3610),
    ("nq-open", "efficientqa", 1800),
    ("hotpotqa", "dev", 100),
    ("squad-v2", "dev", 293),  # answerable only (626 questions, 333 unanswerable)
    ("triviaqa", "dev", 100),
]


def test_default_root_is_next_to_the_repo():
    assert default_data_root() == REPO.parent / "shared" / "data"


def test_registry_covers_every_split():
    assert {(n, s) for n, s, _ in COUNTS} == {(n, s) for n, splits in list_datasets().items() for s in splits}


@needs_data
@pytest.mark.parametrize(("name", "split", "count"), COUNTS)
def test_counts_and_invariants(name, split, count):
    examples = load_dataset(name, split)
    assert len(examples) == count
    assert len({e.id for e in examples}) == count
    for e in examples:
        assert e.question and e.answers and all(isinstance(a, str) and a for a in e.answers)
        assert e.source.startswith(f"{name}:")
        assert e.context is None or e.context.strip()


@needs_data
def test_field_semantics():
    nq = load_dataset("nq-swap", limit=5)
    assert all(e.answers[0] in e.context and e.counterfactual_answer == e.answers[0] for e in nq)
    assert all(e.memorised_answer is None for e in nq)
    assert load_dataset("squad", limit=1)[0].counterfactual_answer is None

    cf = load_dataset("counterfact")[0]  # default split: evidence-1k
    assert (
        cf.id == "counterfact/evidence-1k/3087"
        and cf.question == "David Robinson professionally plays the sport"
    )
    assert (cf.answers, cf.memorised_answer, cf.counterfactual_answer) == (
        ("baseball",),
        "basketball",
        "baseball",
    )
    assert "baseball" in cf.context
    closed = load_dataset("counterfact", "edit-1k", limit=1)[0]
    assert (
        closed.context is None
        and closed.answers == ("basketball",)
        and closed.counterfactual_answer == "baseball"
    )

    oracle = load_dataset("nq-open-oracle", limit=1)[0]
    assert oracle.answers == ("Wilhelm Conrad Röntgen",)
    assert oracle.context.startswith("List of Nobel laureates in Physics\nThe first Nobel Prize")
    assert load_dataset("nq-open", limit=1)[0].answers == ("14 December 1972 UTC", "December 1972")

    hp = load_dataset("hotpotqa")[0]
    assert hp.question == "Were Scott Derrickson and Ed Wood of the same nationality?" and hp.answers == (
        "yes",
    )
    paragraphs = hp.context.split("\n\n")
    assert len(paragraphs) == 10 and paragraphs[0].startswith("Ed Wood (film)\nEd Wood is a 1994")

    tq = load_dataset("triviaqa")[0]
    assert tq.answers[0] == "Sunset Boulevard" and "Sunset Blvd" in tq.answers
    assert len(tq.answers) == len(set(tq.answers))


@needs_data
def test_squad_v2_unanswerable_opt_in():
    every = load_dataset("squad-v2", include_unanswerable=True)
    assert len(every) == 626 and sum(not e.answers for e in every) == 333
    first = load_dataset("squad-v2", limit=2)
    assert first[0].answers == ("France",)
    assert first[1].answers == ("10th and 11th centuries", "in the 10th and 11th centuries")


@needs_data
def test_splits_limit_and_errors():
    assert load_dataset("nq-swap")[0].id == "nq-swap/test/0"  # default split
    assert len(load_dataset("counterfact", "all")) == 13919
    assert len(load_dataset("nq-swap", "all", limit=3)) == 3
    assert load_dataset("triviaqa", limit=0) == []
    with pytest.raises(DataError, match="valid names: nq-swap, confiqa-mc, squad, counterfact"):
        load_dataset("nq_swap")
    with pytest.raises(DataError, match="valid splits: train, dev, test, all"):
        load_dataset("nq-swap", "validation")


def test_missing_root(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        load_dataset("squad", root=missing)
    monkeypatch.setenv(DATA_ENV_VAR, str(missing))
    with pytest.raises(DataError, match=rf"{missing}.*\$MOE_INTERP_DATA"):
        data_root()


def test_env_root_and_missing_file(tmp_path, monkeypatch):
    folder = tmp_path / "triviaqa_100_context"
    folder.mkdir()
    rec = {"question": "Q?", "answer": {"value": "A", "aliases": ["A", "a1"]}, "context": "A ctx"}
    (folder / "final_triviaqa.json").write_text(json.dumps([rec, rec]))
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    examples = load_dataset("triviaqa")
    assert [e.answers for e in examples] == [("A", "a1")] * 2
    with pytest.raises(DataError, match=r"squad/dev.json: file not found"):
        load_dataset("squad")
    bad = [{"question": "Q?", "context": "c"}]
    (folder / "final_triviaqa.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"final_triviaqa.json: record 0: missing field 'answer'"):
        load_dataset("triviaqa")


# --- generic reader --------------------------------------------------------------------------------------

RECORDS = [
    {"ctx": "Paris is big.", "q": "Which city?", "a": "Paris"},
    {"ctx": "c2", "q": "q2", "a": ["x", "y"]},
]


def _write(path: Path, text: str | bytes) -> Path:
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.json.gz", "d.jsonl.gz", "d.ndjson"])
def test_read_json_formats(tmp_path, name):
    text = (
        json.dumps(RECORDS)
        if ".json" in name and ".jsonl" not in name
        else "\n".join(map(json.dumps, RECORDS))
    )
    path = _write(tmp_path / name, text + "\n\n")
    assert list(read_records(path)) == RECORDS
    fields = {"context": "ctx", "question": "q", "answers": "a"}
    examples = load_examples(path, fields)
    assert [e.answers for e in examples] == [("Paris",), ("x", "y")]
    assert examples[0].id == "d/0" and examples[0].source == str(path)


def test_read_csv_and_dotted_paths(tmp_path):
    path = _write(tmp_path / "d.csv.gz", 'id,q,a\n7,"Who, really?","x|y"\n8,"multi\nline",z\n')
    assert list(read_records(path)) == [
        {"id": "7", "q": "Who, really?", "a": "x|y"},
        {"id": "8", "q": "multi\nline", "a": "z"},
    ]
    ex = load_examples(path, {"id": "id", "question": "q", "answers": "a"}, answer_sep="|")
    assert [(e.id, e.context, e.answers) for e in ex] == [("7", None, ("x", "y")), ("8", None, ("z",))]

    nested = _write(tmp_path / "n.json", json.dumps({"data": [{"q": "Q", "ans": {"list": ["A", "B"]}}]}))
    (e,) = load_examples(nested, {"question": "q", "answers": "ans.list.1"}, root="data")
    assert e.answers == ("B",)


def test_jsonl_streams(tmp_path):
    path = _write(tmp_path / "d.jsonl", "\n".join(map(json.dumps, RECORDS)) + "\n{broken\n")
    records = read_records(path)
    assert next(records) == RECORDS[0]  # lazily parsed: the bad last line is not read yet
    with pytest.raises(DataError, match=r"d.jsonl: line 3: not valid JSON Lines"):
        list(records)


def test_missing_field_names_file_record_and_field(tmp_path):
    fields = {"context": "ctx", "question": "q", "answers": "a"}
    jsonl = _write(tmp_path / "d.jsonl", json.dumps(RECORDS[0]) + "\n\n" + json.dumps({"q": "x", "a": "y"}))
    with pytest.raises(DataError, match=r"d.jsonl: line 3: missing field 'ctx' \(for context\)"):
        load_examples(jsonl, fields)
    arr = _write(tmp_path / "d.json", json.dumps([RECORDS[0], {"ctx": "c", "q": "x", "a": {"t": 1}}]))
    with pytest.raises(DataError, match=r"d.json: record 1: field 'a' must be a string or a list"):
        load_examples(arr, fields)
    with pytest.raises(DataError, match=r"d.json: record 0: missing field 'a.0.text'"):
        load_examples(arr, {"question": "q", "answers": "a.0.text"})
    with pytest.raises(DataError, match="missing \\['answers'\\]"):
        load_examples(arr, {"question": "q"})
    with pytest.raises(DataError, match="unknown \\['gold'\\]"):
        list(iter_examples(arr, {"question": "q", "answers": "a", "gold": "a"}))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", "empty file"),
        ("blank.json", "  \n", "empty file"),
        ("empty_array.json", "[]", "empty file"),
        ("header_only.csv", "q,a\n", "empty file"),
        ("latin1.jsonl", b'{"q": "caf\xe9"}\n', "line 1: not valid UTF-8"),
        ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\x00\xff", "not valid UTF-8"),
        ("lines.json", '{"a": 1}\n{"a": 2}\n', "not valid JSON: Extra data.*use format='jsonl'"),
        ("pretty.jsonl", '[\n  {"a": 1}\n]\n', "line 1: not valid JSON Lines.*use format='json'"),
        ("object.json", '{"a": 1}', "expected a JSON array of records at the top level, found dict"),
        ("fake.json.gz", b"[1]", "named .gz but is not gzip-compressed"),
        ("ragged.csv", "q,a\nx,y,z\n", "line 2: 3 CSV fields, header has 2"),
        ("dup.csv", "q,q\nx,y\n", "duplicate column names"),
        ("data.txt", "x", "cannot tell the format"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(DataError, match=message) as info:
        list(read_records(path))
    assert str(path) in str(info.value)
    assert isinstance(info.value, MoEInterpError) and isinstance(info.value, ValueError)


def test_bad_gzip_stream_and_missing_file(tmp_path):
    path = tmp_path / "trunc.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:60])
    with pytest.raises(DataError, match="trunc.jsonl.gz"):
        list(read_records(path))
    with pytest.raises(DataError, match="file not found"):
        list(read_records(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="unknown format"):
        list(read_records(path, format="parquet"))  # type: ignore[arg-type]
