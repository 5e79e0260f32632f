"""Measure the demo model's card numbers.

Exact match (EM): the greedy continuation of the prompt (at most ``MAX_NEW_TOKENS`` tokens, stopped at the
end-of-text token), normalised (lower-cased, punctuation and articles removed, whitespace collapsed),
equals the normalised object or starts with it followed by a space.

Metrics
* ``closed_book``: EM of the true object on ``memorised`` (closed-book prompt).
* ``support``: EM of the context's object on ``support_test`` (held-out facts, supporting context);
  ``support_distractor`` (reference only): the same with one distractor statement in the context.
* ``pc`` / ``po``: on ``conflict_test`` (memorised facts, counterfactual context), EM of the context's
  object / of the memorised object.
* ``expert_usage``: per layer, the fraction of experts selected (top-k) at least once over the
  non-padding tokens of the ``conflict_test`` and ``support_test`` prompts.

``python -m moe_interp.demo.evaluate [--write-card]`` evaluates the shipped weights as loaded by
:func:`moe_interp.demo.load_demo`.
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path

import torch

from moe_interp.prompts import build_prompt

MAX_NEW_TOKENS = 6
EM_DEFINITION = (
    f"greedy continuation (<= {MAX_NEW_TOKENS} new tokens, stopped at EOS), normalised (lower-case, "
    "punctuation and articles removed, whitespace collapsed), equals the object or starts with it + a space"
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Normalised ``prediction`` equals the normalised ``answer`` or starts with it plus a space."""
    p, a = normalize(prediction), normalize(answer)
    return bool(a) and (p == a or p.startswith(a + " "))


def _encode_left(tok, prompts: list[str]) -> dict[str, torch.Tensor]:
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = old


@torch.no_grad()
def first_token_predictions(model, tok, prompts: list[str], batch_size: int = 64) -> list[int]:
    """Greedy next-token id after each prompt (left-padded batches)."""
    out: list[int] = []
    for i in range(0, len(prompts), batch_size):
        enc = _encode_left(tok, prompts[i : i + batch_size])
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = model(**enc, position_ids=pos).logits[:, -1]
        out.extend(logits.argmax(-1).tolist())
    return out


@torch.no_grad()
def greedy_continuations(
    model, tok, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 64
) -> list[str]:
    """Greedy decoded continuations (left padding, stops at EOS), without the prompt."""
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = _encode_left(tok, prompts[i : i + batch_size])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        done = torch.zeros(ids.size(0), dtype=torch.bool)
        new: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
            new.append(nxt)
            done |= nxt == tok.eos_token_id
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, (~done | (nxt == tok.eos_token_id)).long()[:, None]], 1)
            if done.all():
                break
        gen = torch.stack(new, 1)
        outs.extend(tok.batch_decode(gen, skip_special_tokens=True))
    return outs


def stderr(p: float, n: int) -> float:
    """Binomial standard error of a proportion ``p`` over ``n`` examples."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _rate(hits: list[bool]) -> dict[str, float]:
    p = sum(hits) / max(len(hits), 1)
    return {"value": round(p, 4), "n": len(hits), "se": round(stderr(p, len(hits)), 4)}


def closed_book_accuracy(model, tok, facts: list[dict]) -> list[bool]:
    """Per-fact EM of the true object from the closed-book prompt."""
    preds = greedy_continuations(model, tok, [build_prompt(None, f["question"]) for f in facts])
    return [exact_match(p, f["true_object"]) for p, f in zip(preds, facts, strict=True)]


def context_answers(model, tok, recs: list[dict]) -> list[str]:
    """Greedy continuations for records with a ``context`` (paper template + answer cue)."""
    return greedy_continuations(model, tok, [build_prompt(r["context"], r["question"]) for r in recs])


@torch.no_grad()
def expert_usage(model, tok, prompts: list[str], batch_size: int = 64) -> list[dict[str, float]]:
    """Per layer: fraction of experts selected (top-k) at least once, and the largest / smallest share."""
    k, n_exp = model.config.num_experts_per_tok, model.config.num_experts
    counts = torch.zeros(model.config.num_hidden_layers, n_exp)
    for i in range(0, len(prompts), batch_size):
        enc = _encode_left(tok, prompts[i : i + batch_size])
        out = model(**enc, output_router_logits=True)
        keep = enc["attention_mask"].reshape(-1).bool()
        for layer, logits in enumerate(out.router_logits):
            top = logits[keep].topk(k, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(top, minlength=n_exp).float()
    share = counts / counts.sum(-1, keepdim=True)
    return [
        {
            "used_frac": round(float((c > 0).float().mean()), 4),
            "max_share": round(float(s.max()), 4),
            "min_share": round(float(s.min()), 4),
        }
        for c, s in zip(counts, share, strict=True)
    ]


def measure(model, tok, n: int | None = None) -> dict:
    """All card metrics on the first ``n`` records of each split (all records if ``None``)."""
    from moe_interp.demo.splits import load_split

    mem, sup, con = (load_split(s)[:n] for s in ("memorised", "support_test", "conflict_test"))
    res: dict = {"closed_book": _rate(closed_book_accuracy(model, tok, mem))}
    preds = context_answers(model, tok, sup)
    hits = [exact_match(p, r["context_answer"]) for p, r in zip(preds, sup, strict=True)]
    res["support"] = _rate(hits)
    preds = context_answers(model, tok, con)
    res["pc"] = _rate([exact_match(p, r["counterfactual_object"]) for p, r in zip(preds, con, strict=True)])
    res["po"] = _rate([exact_match(p, r["true_object"]) for p, r in zip(preds, con, strict=True)])
    usage_prompts = [build_prompt(r["context"], r["question"]) for r in con + sup]
    res["expert_usage"] = expert_usage(model, tok, usage_prompts)
    return res


def measure_extra(model, tok) -> dict:
    """Reference numbers: closed-book on unseen / conflict-test facts, majority baseline, dev Pc/Po."""
    from collections import Counter

    from moe_interp.demo.splits import load_split

    sup, con, dev = (load_split(s) for s in ("support_test", "conflict_test", "conflict_dev"))
    dis = load_split("support_test_distractor")
    dis_preds = context_answers(model, tok, dis)
    mem = load_split("memorised")
    majority = Counter(f["true_object"] for f in mem).most_common(1)[0][0]
    preds = context_answers(model, tok, dev)
    ctx = [exact_match(p, r["counterfactual_object"]) for p, r in zip(preds, dev, strict=True)]
    mem_hits = [exact_match(p, r["true_object"]) for p, r in zip(preds, dev, strict=True)]
    return {
        "support_distractor": _rate(
            [exact_match(p, r["context_answer"]) for p, r in zip(dis_preds, dis, strict=True)]
        ),
        "closed_book_unseen": _rate(closed_book_accuracy(model, tok, sup)),
        "closed_book_conflict_test_facts": _rate(closed_book_accuracy(model, tok, con)),
        "majority_baseline_memorised": _rate([f["true_object"] == majority for f in mem]),
        "pc_dev": _rate(ctx),
        "po_dev": _rate(mem_hits),
    }


def _fmt(m: dict) -> str:
    return f"{m['value']:.3f} ± {m['se']:.3f} (n={m['n']})"


def write_card(res: dict, extra: dict, meta: dict, folder: Path) -> None:
    """Write ``card.json`` and ``MODEL_CARD.md`` into ``folder``."""
    card = {
        "metrics": res,
        "extra": extra,
        "exact_match": EM_DEFINITION,
        "training": {k: v for k, v in meta.items() if k != "log"},
        "test_sample_n": TEST_SAMPLE_N,
    }
    (folder / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    chosen = meta.get("chosen", {})
    usage = "\n".join(
        f"| {i} | {u['used_frac']:.2f} | {u['max_share']:.3f} | {u['min_share']:.3f} |"
        for i, u in enumerate(res["expert_usage"])
    )
    log = "\n".join(
        f"| {r['step']} | {r['elapsed_s']:.0f} | {r['closed_book']:.2f} | {r['support_dev']:.2f} | "
        f"{r['pc_dev']:.2f} | {r['po_dev']:.2f} |"
        for r in meta.get("log", [])
    )
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    sizes = "\n".join(f"  - `{p.name}`: {p.stat().st_size / 1e6:.2f} MB" for p in files)
    mk = meta.get("model", {})
    text = CARD_TEMPLATE.format(
        **{k: _fmt(v) for k, v in {**res, **extra}.items() if isinstance(v, dict) and "value" in v},
        usage=usage,
        log=log,
        sizes=sizes,
        total_mb=sum(p.stat().st_size for p in files) / 1e6,
        em=card["exact_match"],
        params=meta.get("n_params", 0) / 1e6,
        model=json.dumps(mk),
        arch=json.loads((folder / "config.json").read_text())["architectures"][0],
        window=(
            f"Layer 0 is a sliding-window layer (it attends to the last {meta['first_window']} tokens only), "
            "so the context is read by layers 1-3, after layer 0's experts: the context-vs-memory choice can "
            "live in the experts (on a model whose layer 0 reads everything, it was made in layer 0)."
            if meta.get("first_window")
            else "Every layer attends to the whole prompt."
        ),
        steps=meta.get("total_steps"),
        cosine_steps=meta.get("total_steps", 0) - meta.get("tail_steps", 0),
        chosen_step=chosen.get("step"),
        train_min=meta.get("train_seconds", 0) / 60,
        tokens=meta.get("tokens", 0) / 1e6,
        seed=meta.get("seed"),
        lr=meta.get("lr"),
        warmup=meta.get("warmup"),
        cb_repeat=meta.get("cb_repeat"),
        pool_repeat=meta.get("pool_repeat", 1),
        pool_cf=meta.get("pool_cf", 0.0),
        late_epoch=meta.get("late_epoch"),
        late_cb_repeat=meta.get("late_cb_repeat"),
        late_pool_repeat=meta.get("late_pool_repeat"),
        late_p_context=meta.get("late_p_context"),
        tail_steps=meta.get("tail_steps", 0),
        tail_conflict_repeat=meta.get("tail_conflict_repeat"),
        tail_p_context=meta.get("tail_p_context"),
        tail_pool_repeat=meta.get("tail_pool_repeat"),
        tail_cb_repeat=meta.get("tail_cb_repeat"),
        note=f"\n  {meta['note']}" if meta.get("note") else "",
        tail_pool_s="" if meta.get("tail_pool_repeat") == 1 else "s",
        threads_s="" if meta.get("threads", 2) == 1 else "s",
        p_context=meta.get("p_context"),
        answer_weight=meta.get("answer_weight"),
        tokens_per_batch=meta.get("tokens_per_batch"),
        threads=meta.get("threads", 2),
        n=TEST_SAMPLE_N,
    )
    (folder / "MODEL_CARD.md").write_text(text)


CARD_TEMPLATE = """# moe_interp demo model

A tiny `{arch}` trained from scratch on CounterFact facts so that the toolkit's examples and tests
have a real Mixture-of-Experts model with memorised facts, a context-reading skill and a measurable
memory-vs-context conflict. It is a toy: it knows only the template below and the facts it was trained on.

Load it with `moe_interp.demo.load_demo()` (offline, float32, eval mode). Data splits:
`moe_interp.demo.load_split(name)`.

## Model
- {window}
- Config: {model}; byte-level BPE tokenizer, 12k vocabulary, no chat template; {params:.2f}M parameters.
- Stored in float16 (safetensors), loaded as float32. Files ({total_mb:.1f} MB in all):
{sizes}

## Prompt format
`moe_interp.prompts.build_prompt(context, question)`: the paper's user turn ("Based on the context below,
output the correct answer for the following question.\\n\\nContext:\\n...\\n\\nQuestion:\\n...") followed by
`"\\n\\nAnswer:"`; closed-book prompts are `"Question:\\n{{question}}\\n\\nAnswer:"`. The answer follows
after a space and ends with the end-of-text token. Questions are CounterFact cloze prompts; a context is the
statement `"{{prompt}} {{object}}."`, alone (`support_test`) or with one distractor statement about another
held-out fact (`support_test_distractor`, every second `conflict_*` record, half of `support_dev`).

## Training recipe
- Data (CounterFact edit + val, grouped by subject, every subject in one split only):
  `memorised` 2350 facts trained closed-book ({cb_repeat} times per epoch); `context_pool` ~9k facts seen
  only inside contexts ({pool_repeat} times per epoch, with 0-3 distractor statements, 30% of the same
  relation); pool statements (target and distractors) state the counterfactual object with probability
  {pool_cf}, so pool facts cannot be memorised and copying is the only way to answer them. The 1000
  memorised facts with role `train` also appear with a supporting context (half of them per epoch) and with a
  counterfactual context whose target is the context's object with probability {p_context} and the memorised
  object otherwise (this mixture sets the baseline faithfulness). The `conflict_test` / `conflict_dev` /
  `conflict_tune` facts are memorised but never shown with a context. `support_test` / `support_dev` facts
  are never trained on.
- Late phase: from epoch {late_epoch} on, {late_cb_repeat} closed-book lines per fact,
  {late_pool_repeat} context examples per pool fact and conflict targets following the context with
  probability {late_p_context} (memory is learnt by then; this shifts compute to copying and lowers Pc).
- Tail: {tail_steps} extra steps at the final learning rate (10% of peak), starting a fresh epoch with
  {tail_conflict_repeat} counterfactual-context examples per `train` fact (context target with probability
  {tail_p_context}), {tail_pool_repeat} context example{tail_pool_s} per pool fact and
  {tail_cb_repeat} closed-book lines per fact.
- Loss: next-token cross-entropy on the answer and end-of-text tokens (weight {answer_weight} + 1) and on the
  question tokens of context examples (weight 0.5; predicting them is copying); router load-balancing loss
  0.01.
- AdamW (betas 0.9/0.95, weight decay 0.01), peak lr {lr}, {warmup} warm-up steps, cosine to 10%, gradient
  clip 1.0, length-bucketed batches of <= {tokens_per_batch} padded tokens, {steps} steps in all (cosine
  over the first {cosine_steps}), seed {seed},
  {threads} CPU thread{threads_s}; {tokens:.1f}M non-padding tokens, {train_min:.0f} min wall-clock
  (shared CPU).{note}
- Snapshots were evaluated on the dev splits every 250 steps; the shipped weights are the step {chosen_step}
  snapshot (rule: `moe_interp.demo.train.select_snapshot`: closed-book >= 0.95 and dev Pc in [0.15, 0.65],
  so that conflicts are not already mostly answered from the context; among those, support_dev >= 0.92 and
  Pc closest to 0.40, else the best support_dev):

| step | seconds | closed-book (train facts) | support_dev | Pc dev | Po dev |
|---|---|---|---|---|---|
{log}

(dev numbers: greedy first token, 150 examples each.)

## Measured numbers (shipped weights, as loaded by `load_demo`)
Exact match: {em}. Values are proportions ± binomial standard error.

| metric | split | value |
|---|---|---|
| closed-book accuracy | `memorised` | {closed_book} |
| accuracy with supporting context | `support_test` (held-out facts) | {support} |
| ... plus one distractor statement | `support_test_distractor` (same facts) | {support_distractor} |
| Pc: answers the context's object | `conflict_test` | {pc} |
| Po: answers the memorised object | `conflict_test` | {po} |
| Pc / Po on the dev split | `conflict_dev` | {pc_dev} / {po_dev} |
| closed-book accuracy, held-out facts | `support_test` | {closed_book_unseen} |
| closed-book accuracy, conflict-test facts | `conflict_test` | {closed_book_conflict_test_facts} |
| majority-object baseline | `memorised` | {majority_baseline_memorised} |

Expert load per layer (top-2 selections over the non-padding prompt tokens of `conflict_test` +
`support_test`):

| layer | experts used | largest share | smallest share |
|---|---|---|---|
{usage}

`tests/test_demo.py` re-measures these metrics on the first {n} records of each split and checks them
against `card.json` within a tolerance derived from the standard error.

## Regenerate
`python -m moe_interp.demo.train --threads {threads}` (splits, tokenizer, training, export; the thread count
changes the floating-point order, so use the one above for these exact weights), then
`python -m moe_interp.demo.evaluate --write-card`.
"""

TEST_SAMPLE_N = 100


def main(argv: list[str] | None = None) -> None:
    """Evaluate the shipped weights; with ``--write-card`` also write the model card files."""
    import argparse

    from moe_interp.demo import WEIGHTS_DIR, load_demo

    ap = argparse.ArgumentParser(description="Measure the demo model's card numbers.")
    ap.add_argument("--write-card", action="store_true")
    ap.add_argument("--card-only", action="store_true", help="re-render MODEL_CARD.md from card.json")
    ap.add_argument("--n", type=int, default=None, help="first N records per split (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta_path = WEIGHTS_DIR / "train_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if args.card_only:
        card = json.loads((WEIGHTS_DIR / "card.json").read_text())
        write_card(card["metrics"], card["extra"], meta, WEIGHTS_DIR)
        return
    model, tok = load_demo()
    res = measure(model, tok, args.n)
    extra = measure_extra(model, tok)
    print(json.dumps({**res, **extra}, indent=1))
    if args.write_card:
        write_card(res, extra, meta, WEIGHTS_DIR)


if __name__ == "__main__":
    main()
