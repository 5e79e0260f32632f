"""Batched greedy answering, teacher-forced answer scoring, and resumable QA / knowledge-conflict evaluation.

>>> preds = generate_answers(model, tok, [build_prompt(ctx, q)])              # doctest: +SKIP
>>> scores = score_answers(model, tok, [build_prompt(ctx, q)], [" Paris"])    # doctest: +SKIP
>>> res = evaluate(model, tok, load_dataset("nq-swap", limit=200), out="runs/nqswap.jsonl")  # doctest: +SKIP
>>> res.EM, res.Pc, res.MR, res.summary()                                     # doctest: +SKIP

Batches are left-padded by hand (the caller's tokenizer is never modified) and sorted by length; results
equal one-at-a-time computation up to floating-point noise. Prompts are encoded with
:func:`~moe_interp.prompts.prompt_ids` (leading BOS kept, trailing EOS dropped).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from moe_interp.atomic import atomic_write
from moe_interp.data.example import QAExample
from moe_interp.data.metrics import (
    ConflictOutcome,
    MatchMode,
    aggregate_conflict,
    conflict_outcome,
    exact_match,
    f1_score,
)
from moe_interp.errors import DataError, InputError, MoEInterpError
from moe_interp.prompts import FormattedPrompt, format_example, prompt_ids
from moe_interp.signature import forward_accepts

Mode = Literal["generate", "score"]
MODES = ("generate", "score")

# --- batching helpers ----------------------------------------------------------------------------------


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0  # every pad position is masked out, so any id works


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The model's generation-config EOS id(s) plus the tokenizer's."""
    ids: list[int] = []
    for src in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if src is not None:
            ids.extend([src] if isinstance(src, int) else list(src))
    return list(dict.fromkeys(int(i) for i in ids))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to ``[B, T]`` ids and a ``[B, T]`` attention mask (1 = real token)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, length - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, length - len(seq) :] = 1
    return ids, mask


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` positions counting real tokens only (0 on left padding), as ``generate`` uses."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (stable order within equal lengths)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@contextmanager
def preserved_mode(model: Any) -> Iterator[None]:
    """Put ``model`` in eval mode; afterwards restore every submodule's own train/eval flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_texts(texts: Sequence[str], name: str) -> None:
    if isinstance(texts, str):
        raise InputError(f"{name} must be a list of strings, not a single string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"{name}[{i}] is a {type(t).__name__}, not a string")


def _encode_all(tokenizer: Any, prompts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    encoded = []
    for i, p in enumerate(prompts):
        ids = prompt_ids(tokenizer, p, add_special_tokens=add_special_tokens)
        if not ids:
            raise InputError(f"prompts[{i}] encodes to no tokens; nothing to condition on")
        encoded.append(ids)
    return encoded


# --- generation ----------------------------------------------------------------------------------------


def _cut(text: str, stop: Sequence[str]) -> str:
    """Leading whitespace removed, then everything from the first stop string on."""
    text = text.lstrip()
    hits = [text.find(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else text


def _decode_new(tokenizer: Any, ids: list[int], eos: set[int]) -> str:
    end = next((k for k, t in enumerate(ids) if t in eos), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _stop_criteria(tokenizer: Any, stop: Sequence[str], prompt_len: int, eos: set[int]) -> Any:
    """A stopping criterion that marks rows whose new text (after leading whitespace) has a stop string."""
    from transformers.generation import StoppingCriteria, StoppingCriteriaList

    class _StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = [
                any(s in _decode_new(tokenizer, row, eos).lstrip() for s in stop)
                for row in input_ids[:, prompt_len:].tolist()
            ]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_StopStrings()])


def _generate_batch(
    model: Any, tokenizer: Any, batch: list[list[int]], max_new_tokens: int, stop: Sequence[str]
) -> list[str]:
    from transformers import GenerationConfig

    pad, eos = _pad_id(tokenizer), _eos_ids(model, tokenizer)
    ids, mask = left_pad(batch, pad)
    device = _device(model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos or None,
    )
    stop = [s for s in stop if s]
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        stopping_criteria=_stop_criteria(tokenizer, stop, ids.shape[1], set(eos)) if stop else None,
    )
    new = out[:, ids.shape[1] :].tolist()
    return [_cut(_decode_new(tokenizer, row, set(eos)), stop).strip() for row in new]


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    add_special_tokens: bool = True,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to ``prompts`` (one string each, aligned with ``prompts``).

    Batches are left-padded and sorted by length; ``model.generate`` runs with ``do_sample=False`` and a
    fresh generation config (the model's EOS id(s) plus the tokenizer's stop generation). Only the new
    tokens are decoded (up to the first EOS, special tokens skipped); leading whitespace is removed and the
    text is cut at the first ``stop`` string, then stripped. Generation of a row also halts once a stop
    string appears. Same outputs as ``batch_size=1``; the model's train/eval flags are restored.

    Args:
        add_special_tokens: Let the tokenizer add its leading special tokens (BOS); ``False`` for prompts
            rendered by a chat template that already contain them.
    """
    _check_texts(prompts, "prompts")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(stop, str):
        stop = (stop,)
    encoded = _encode_all(tokenizer, prompts, add_special_tokens)
    answers: list[str] = [""] * len(prompts)
    batches = list(_length_batches([len(e) for e in encoded], batch_size))
    with preserved_mode(model):
        for idx in tqdm(batches, desc="generate", unit="batch", disable=not progress):
            texts = _generate_batch(model, tokenizer, [encoded[i] for i in idx], max_new_tokens, stop)
            for i, text in zip(idx, texts, strict=True):
                answers[i] = text
    return answers


# --- scoring -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerScores:
    """Teacher-forced log-probabilities of answer continuations (natural log).

    Attributes:
        logprob: ``[N]`` float64, sum of the answer tokens' log-probabilities.
        n_tokens: ``[N]`` int64, number of answer tokens.
        token_logprobs: ``N`` tensors ``[n_tokens_i]`` (float32), per answer token.
    """

    logprob: torch.Tensor
    n_tokens: torch.Tensor
    token_logprobs: list[torch.Tensor]

    @property
    def mean(self) -> torch.Tensor:
        """``[N]`` mean log-probability per answer token."""
        return self.logprob / self.n_tokens

    def __len__(self) -> int:
        return len(self.token_logprobs)


def split_continuation(
    tokenizer: Any, prompt: str, answer: str, *, add_special_tokens: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``answer`` as its continuation.

    The prompt ids are those generation uses. The answer ids are the tail of the encoding of
    ``prompt + answer`` when that encoding starts with the prompt ids (as usual when the answer starts
    with a space or the prompt ends a word), else the answer encoded on its own.
    """
    head = prompt_ids(tokenizer, prompt, add_special_tokens=add_special_tokens)
    whole = prompt_ids(tokenizer, prompt + answer, add_special_tokens=add_special_tokens)
    if whole[: len(head)] == head and len(whole) > len(head):
        return head, whole[len(head) :]
    return head, list(tokenizer(answer, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def score_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    progress: bool = False,
) -> AnswerScores:
    """Log-probability of each ``answers[i]`` as the continuation of ``prompts[i]`` (teacher forcing).

    The answer string is scored literally: include the separator the prompt format expects (``" Paris"``
    after the paper's ``"Answer:"``; see :attr:`~moe_interp.prompts.FormattedPrompt.answer_prefix`).
    Token split: :func:`split_continuation`. Batches are left-padded with explicit position ids and only
    the last ``max answer length + 1`` positions' logits are computed where the model supports
    ``logits_to_keep``. Equal to one-at-a-time computation up to float noise.
    """
    _check_texts(prompts, "prompts")
    _check_texts(answers, "answers")
    if len(prompts) != len(answers):
        raise InputError(f"{len(prompts)} prompts but {len(answers)} answers")
    pairs = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        head, tail = split_continuation(tokenizer, p, a, add_special_tokens=add_special_tokens)
        if not head:
            raise InputError(f"prompts[{i}] encodes to no tokens; nothing to condition on")
        if not tail:
            raise InputError(f"answers[{i}] = {a!r} encodes to no tokens; nothing to score")
        pairs.append((head, tail))
    token_lps: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    device, pad = _device(model), _pad_id(tokenizer)
    keep_arg = forward_accepts(model, "logits_to_keep")
    batches = list(_length_batches([len(h) + len(t) for h, t in pairs], batch_size))
    with preserved_mode(model):
        for idx in tqdm(batches, desc="score", unit="batch", disable=not progress):
            ids, mask = left_pad([pairs[i][0] + pairs[i][1] for i in idx], pad)
            keep = max(len(pairs[i][1]) for i in idx) + 1
            kwargs = {"logits_to_keep": keep} if keep_arg else {}
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=_position_ids(mask).to(device),
                use_cache=False,
                **kwargs,
            ).logits[:, -keep:]
            logps = logits.float().log_softmax(-1).cpu()  # [B, keep, V]
            for row, i in enumerate(idx):
                tail = torch.tensor(pairs[i][1])
                n = len(tail)
                # tokens at the last n positions are predicted by the n positions before them
                token_lps[i] = logps[row, keep - n - 1 : keep - 1].gather(-1, tail[:, None])[:, 0]
    return AnswerScores(
        logprob=torch.tensor([t.double().sum().item() for t in token_lps], dtype=torch.float64),
        n_tokens=torch.tensor([len(t) for t in token_lps], dtype=torch.long),
        token_logprobs=token_lps,
    )


# --- results frame -------------------------------------------------------------------------------------

BASE_COLUMNS = ("id", "prediction", "em", "f1", "pc", "po", "has_context", "answer_in_context")
SCORE_COLUMNS = ("logprob", "logprob_memorised")
_FLOAT_COLUMNS = ("em", "f1", "pc", "po", *SCORE_COLUMNS)
_BOOL_COLUMNS = ("has_context", "answer_in_context")


def _nan_if_none(x: Any) -> float:
    return math.nan if x is None else float(x)


class EvalFrame(pd.DataFrame):
    """Per-example results (one row per example, in input order) with summary accessors.

    Columns: ``id``, ``prediction``, ``em``, ``f1`` (SQuAD), ``pc`` / ``po`` (prediction matches the
    context / memorised answer; ``po`` NaN without a memorised answer), ``has_context``,
    ``answer_in_context`` (some gold answer occurs in the context); score mode adds ``logprob`` (best gold
    answer) and ``logprob_memorised``. Accessors recompute from the rows, so they work on filtered frames
    too (``res[res.answer_in_context].Pc``).
    """

    @property
    def _constructor(self) -> type[EvalFrame]:
        return EvalFrame

    def _conflict(self) -> Any:
        outcomes = [
            ConflictOutcome(pc=bool(pc), po=None if math.isnan(po) else bool(po))
            for pc, po in zip(self["pc"].astype(float), self["po"].astype(float), strict=True)
        ]
        return aggregate_conflict(outcomes)

    @property
    def EM(self) -> float:  # noqa: N802 - the metric's name
        """Mean exact match."""
        return float(self["em"].mean()) if len(self) else math.nan

    @property
    def F1(self) -> float:  # noqa: N802
        """Mean token F1."""
        return float(self["f1"].mean()) if len(self) else math.nan

    @property
    def Pc(self) -> float:  # noqa: N802
        """Fraction of examples whose prediction matches the context answer."""
        return self._conflict().pc

    @property
    def Po(self) -> float:  # noqa: N802
        """Fraction of examples with a memorised answer whose prediction matches it."""
        return self._conflict().po

    @property
    def MR(self) -> float:  # noqa: N802
        """Memorisation ratio Po / (Po + Pc) over examples with a memorised answer (NaN if undefined)."""
        return self._conflict().mr

    def summary(self) -> dict[str, float | int]:
        """EM, F1, Pc, Po, MR and counts as a dict."""
        scores = self._conflict()
        return {
            "n": len(self),
            "EM": self.EM,
            "F1": self.F1,
            "Pc": scores.pc,
            "Po": scores.po,
            "MR": scores.mr,
            "n_memorised": scores.n_memorised,
            "n_with_context": int(self["has_context"].sum()),
            "n_answer_in_context": int(self["answer_in_context"].sum()),
        }


def _frame(rows: list[dict[str, Any]], mode: str) -> EvalFrame:
    columns = [*BASE_COLUMNS, *(SCORE_COLUMNS if mode == "score" else ())]
    frame = EvalFrame([{c: r[c] for c in columns} for r in rows], columns=columns)
    for c in columns:
        if c in _FLOAT_COLUMNS:
            frame[c] = frame[c].map(_nan_if_none).astype("float64")
        elif c in _BOOL_COLUMNS:
            frame[c] = frame[c].astype(bool)
        else:
            frame[c] = frame[c].astype(str)
    return frame


# --- resumable output ----------------------------------------------------------------------------------


def _sidecar(out: Path, kind: str) -> Path:
    base = out.with_suffix("") if out.suffix == ".jsonl" else out
    return base.with_name(f"{base.name}.{kind}.json")


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace`` (NaN -> null)."""
    text = json.dumps(_json_safe(obj), indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_results(path: str | os.PathLike[str], required: Sequence[str] = ("id",)) -> dict[str, dict]:
    """Rows of a results JSONL by id, repairing a torn last line (from a kill) by truncating it.

    Raises:
        DataError: a line other than the last is not a JSON object with the ``required`` keys.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    rows: dict[str, dict] = {}
    pos, keep = 0, len(data)
    pieces = data.split(b"\n")
    for k, line in enumerate(pieces):
        last = all(not p.strip() for p in pieces[k + 1 :])
        if line.strip():
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and all(c in rec for c in required) and isinstance(rec["id"], str)
            except (json.JSONDecodeError, UnicodeDecodeError):
                ok = False
            if not ok:
                if not last:
                    raise DataError(
                        f"{path}: line {k + 1} is not a result record with keys {', '.join(required)}; "
                        "was this file written by another mode or program?"
                    )
                keep = pos  # torn by a kill: drop it, it will be recomputed
                break
            rows[rec["id"]] = rec
        pos += len(line) + 1
    if keep < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(keep)
    elif data and not data.endswith(b"\n"):
        with open(path, "ab") as fh:  # complete record without its newline
            fh.write(b"\n")
    return rows


def _append(fh: Any, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        fh.write(json.dumps(_json_safe(row), ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


# --- evaluate ------------------------------------------------------------------------------------------


def _check_examples(examples: Sequence[QAExample]) -> None:
    if isinstance(examples, (str, QAExample)):
        raise InputError("examples must be a list of QAExample")
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if not isinstance(ex, QAExample):
            raise InputError(f"examples[{i}] is a {type(ex).__name__}, not a QAExample")
        if not isinstance(ex.id, str) or not ex.id:
            raise InputError(f"examples[{i}]: id must be a non-empty string, got {ex.id!r}")
        where = f"examples[{i}] (id {ex.id!r})"
        if ex.id in seen:
            raise InputError(f"{where}: duplicate id (also examples[{seen[ex.id]}]); ids must be unique")
        seen[ex.id] = i
        if not isinstance(ex.question, str) or not ex.question.strip():
            raise InputError(f"{where}: question is missing or empty ({ex.question!r})")
        if ex.context is not None and not isinstance(ex.context, str):
            raise InputError(f"{where}: context must be a string or None, got {type(ex.context).__name__}")
        bad = [a for a in ex.answers if not isinstance(a, str)]
        if bad:
            raise InputError(f"{where}: answers must be strings, got {bad[0]!r}")


def _candidates(ex: QAExample) -> list[str]:
    """Answers to score in score mode: golds, then the memorised and counterfactual answers."""
    extra = [ex.memorised_answer, ex.counterfactual_answer]
    return list(dict.fromkeys(a for a in [*ex.answers, *extra] if a))


def _row(ex: QAExample, fp: FormattedPrompt, prediction: str, match: MatchMode) -> dict[str, Any]:
    outcome = conflict_outcome(prediction, ex, match=match)
    return {
        "id": ex.id,
        "prediction": prediction,
        "em": exact_match(prediction, ex.answers),
        "f1": f1_score(prediction, ex.answers),
        "pc": float(outcome.pc),
        "po": None if outcome.po is None else float(outcome.po),
        "has_context": ex.context is not None,
        "answer_in_context": fp.answer_in_context,
    }


def _score_rows(
    model: Any,
    tokenizer: Any,
    batch: list[tuple[QAExample, FormattedPrompt]],
    match: MatchMode,
    batch_size: int,
) -> list[dict[str, Any]]:
    cands = [_candidates(ex) for ex, _ in batch]
    prompts = [fp.text for (_, fp), cs in zip(batch, cands, strict=True) for _ in cs]
    answers = [fp.answer_prefix + c for (_, fp), cs in zip(batch, cands, strict=True) for c in cs]
    specials = batch[0][1].add_special_tokens
    lp = (
        score_answers(
            model, tokenizer, prompts, answers, batch_size=batch_size, add_special_tokens=specials
        ).logprob.tolist()
        if prompts
        else []
    )
    rows, at = [], 0
    for (ex, fp), cs in zip(batch, cands, strict=True):
        scores = dict(zip(cs, lp[at : at + len(cs)], strict=True))
        at += len(cs)
        prediction = max(cs, key=lambda c: scores[c]) if cs else ""
        golds = [scores[a] for a in ex.answers if a in scores]
        row = _row(ex, fp, prediction, match)
        row["logprob"] = max(golds) if golds else None
        row["logprob_memorised"] = scores.get(ex.memorised_answer) if ex.memorised_answer else None
        rows.append(row)
    return rows


_PROBE_TEXT = "Question: What is the capital of France?\nAnswer:"


@torch.no_grad()
def _probe_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"][-32:]
    device = next(model.parameters()).device
    with preserved_mode(model):
        model.eval()
        return model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()


def model_probe(model: Any, tokenizer: Any) -> dict[str, Any]:
    """What identifies the model that wrote a results file: its five largest next-token logits after a fixed
    text (a behavioural check that also sees hooks), every parameter tensor's sum (tuned router weights,
    another checkpoint) and the expert masks active on it (:func:`moe_interp.routerlens.mask_experts`)."""
    top = _probe_logits(model, tokenizer).topk(5)
    return {
        "ids": top.indices.tolist(),
        "logits": [round(float(v), 4) for v in top.values],
        "param_sums": _param_sums(model),
        "masks": _active_masks(model),
    }


def _param_sums(model: Any) -> list[float]:
    return [float(torch.sum(p.detach(), dtype=torch.float64)) for p in model.parameters()]


def _active_masks(model: Any) -> dict[str, list[int]]:
    from moe_interp.routerlens.masking import active_masks

    try:
        return {str(k): v for k, v in active_masks(model).items()}
    except MoEInterpError:  # not a registered MoE model: nothing can be masked
        return {}


def _same_model(old: dict[str, Any], model: Any, tokenizer: Any) -> bool:
    if old.get("masks", {}) != _active_masks(model):
        return False
    if "param_sums" in old:
        sums = _param_sums(model)
        if len(sums) != len(old["param_sums"]) or not all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
            for a, b in zip(sums, old["param_sums"], strict=True)
        ):
            return False
    got = _probe_logits(model, tokenizer)[torch.tensor(old["ids"])]
    return bool(torch.allclose(got, torch.tensor(old["logits"]), rtol=2e-2, atol=2e-2))


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[QAExample],
    *,
    out: str | os.PathLike[str] | None = None,
    template: str = "paper",
    batch_size: int = 16,
    max_new_tokens: int = 32,
    mode: Mode = "generate",
    stop: Sequence[str] = ("\n",),
    match: MatchMode = "contains",
    progress: bool = True,
) -> EvalFrame:
    """Answer every example and score it: EM / F1 against the gold answers, Pc / Po / MR (conflict).

    Args:
        template: ``"paper"``, ``"chat"`` or a custom format string (see
            :func:`~moe_interp.prompts.format_example`).
        mode: ``"generate"``: greedy answers (:func:`generate_answers`). ``"score"``: forced choice among
            the gold, memorised and counterfactual answers by summed log-probability
            (:func:`score_answers`); the best candidate is the prediction.
        out: Results JSONL. Rows are appended (and fsynced) per batch as they complete; a rerun skips the
            ids already there (a torn last line is dropped and recomputed; rows of ids not in
            ``examples`` stay in the file but not in the frame). The configuration is kept in
            ``<out stem>.config.json`` (a rerun with another mode / template / stop / match /
            max_new_tokens is refused, and so is another model: other parameter values (another
            checkpoint, tuned routers), other expert masks, or other answers to a fixed probe; see
            :func:`model_probe`) and the summary in
            ``<out stem>.summary.json``, written atomically.
        match: How ``pc`` / ``po`` compare predictions (``"contains"`` or ``"em"``).

    Returns:
        An :class:`EvalFrame` in input order (``res.EM``, ``res.F1``, ``res.Pc``, ``res.Po``, ``res.MR``,
        ``res.summary()``). The model's train/eval flags are restored; the tokenizer is not modified.

    Raises:
        InputError: invalid examples (names the index and id) or arguments; ``out`` holds another
            configuration. DataError: ``out`` has a corrupt line other than the last.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if match not in ("contains", "em"):
        raise InputError(f"unknown match mode {match!r}; expected 'contains' or 'em'")
    if batch_size < 1 or max_new_tokens < 1:
        raise InputError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if isinstance(examples, (str, QAExample)):
        raise InputError("examples must be a list of QAExample (or of dicts)")
    examples = list(examples)
    if any(isinstance(ex, Mapping) for ex in examples):  # dict records, as every other API takes them
        from moe_interp.routerlens.data import to_examples

        examples = to_examples(examples)
    _check_examples(examples)
    formatted = [format_example(ex, tokenizer, template=template, tokenize=False) for ex in examples]
    config = {
        "mode": mode,
        "template": template,
        "max_new_tokens": max_new_tokens if mode == "generate" else None,
        "stop": list(stop) if mode == "generate" else None,
        "match": match,
    }
    columns = [*BASE_COLUMNS, *(SCORE_COLUMNS if mode == "score" else ())]
    path = Path(out) if out is not None else None
    done: dict[str, dict] = {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path = _sidecar(path, "config")
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
            probe = old.pop("model_probe", None)
            if old != config:
                raise InputError(
                    f"{path} was written with configuration {old}, not {config}; use another out path"
                )
            if probe is not None and not _same_model(probe, model, tokenizer):
                raise InputError(
                    f"{path} was written by a model that answers differently (other parameters, e.g. another "
                    "checkpoint or tuned routers, other expert masks, or other probe logits); use another "
                    "out path"
                )
        else:
            write_json_atomic(cfg_path, {**config, "model_probe": model_probe(model, tokenizer)})
        done = read_results(path, required=columns)
    wanted = {ex.id for ex in examples}
    pending = [i for i, ex in enumerate(examples) if ex.id not in done]
    n_done = len(examples) - len(pending)
    rows = {k: v for k, v in done.items() if k in wanted}
    lengths = [len(formatted[i].text) for i in pending]
    fh = open(path, "a", encoding="utf-8") if path is not None else None
    bar = tqdm(
        total=len(examples), initial=n_done, desc=f"evaluate ({mode})", unit="ex", disable=not progress
    )
    try:
        with preserved_mode(model):
            for group in _length_batches(lengths, batch_size):
                batch = [(examples[pending[j]], formatted[pending[j]]) for j in group]
                if mode == "generate":
                    preds = generate_answers(
                        model,
                        tokenizer,
                        [fp.text for _, fp in batch],
                        batch_size=len(batch),
                        max_new_tokens=max_new_tokens,
                        stop=stop,
                        add_special_tokens=batch[0][1].add_special_tokens,
                    )
                    new = [_row(ex, fp, p, match) for (ex, fp), p in zip(batch, preds, strict=True)]
                else:
                    new = _score_rows(model, tokenizer, batch, match, batch_size)
                if fh is not None:
                    _append(fh, new)
                rows.update((r["id"], r) for r in new)
                bar.update(len(new))
    finally:
        bar.close()
        if fh is not None:
            fh.close()
    frame = _frame([rows[ex.id] for ex in examples], mode)
    frame.attrs["config"] = config
    if path is not None:
        write_json_atomic(_sidecar(path, "summary"), {**frame.summary(), "config": config})
    return frame


__all__ = [
    "AnswerScores",
    "EvalFrame",
    "evaluate",
    "generate_answers",
    "left_pad",
    "preserved_mode",
    "read_results",
    "score_answers",
    "split_continuation",
    "write_json_atomic",
]
