"""Train the embedded demo MoE model from scratch.

``python -m moe_interp.demo.train [--out DIR] [--steps N] [--resume]`` builds the CounterFact splits and a
byte-level BPE tokenizer, trains a small Qwen2-MoE model whose first layer is a sliding-window layer
(``--first-window``; 0 trains the earlier OLMoE demo instead) (seeded, resumable from the checkpoint in
``--out``), evaluates snapshots on the dev splits, and exports the chosen snapshot in float16 to
``moe_interp/demo/weights/`` together with the tokenizer. The model card is written by
``python -m moe_interp.demo.evaluate --write-card``. Never run by the tests.

Training data, regenerated each epoch from the seed (contexts use the paper's template, see
:mod:`moe_interp.prompts`):

* closed-book lines for every ``memorised`` fact (``CB_REPEAT`` per epoch);
* ``POOL_REPEAT`` context examples per ``context_pool`` fact: its statement plus 0-3 distractor statements;
  the statement (and target) uses the counterfactual object with probability ``POOL_CF``, so that pool
  facts cannot be memorised and copying is the only way to answer them;
* for memorised facts with role ``train``: a supporting context (half of them) and a counterfactual context
  whose target is the context's object with probability ``P_CONTEXT`` and the memorised object otherwise.
  This mixture sets the model's baseline faithfulness under conflict.
* late phase (epochs >= ``LATE_EPOCH``): fewer closed-book lines, more pool contexts and a lower
  ``P_CONTEXT`` (``--late-*`` options);
* tail (``--tail-steps`` extra steps at the final 10% learning rate, starting a fresh epoch): several
  counterfactual-context examples per ``train`` fact with a low ``P_CONTEXT`` (``--tail-*`` options).

The conflict-test, -dev and -tune facts are never shown with any context.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_interp.demo import splits as S
from moe_interp.prompts import ANSWER_CUE, build_prompt

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SEED = 0
CB_REPEAT = 5
POOL_REPEAT = 2
P_CONTEXT = 0.4
POOL_CF = 0.5
LATE_EPOCH = 3
TAIL_STEPS = 750
FIRST_WINDOW = 8
ANSWER_WEIGHT = 2.0
QUESTION_WEIGHT = 0.5
TOKENS_PER_BATCH = 2400
MAX_BATCH = 128
MODEL_KW = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=16,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    router_aux_loss_coef=0.01,
    tie_word_embeddings=False,
)
PAD, EOS = "<|pad|>", "<|endoftext|>"


def local_first_layer_kw(model_kw: dict, window: int) -> dict:
    """Qwen2-MoE settings with the demo's sizes whose first layer is a sliding-window layer of ``window``
    tokens: the same experts, top-k, heads and widths, a minimal (16-wide) shared expert, no qkv bias."""
    kw = dict(model_kw)
    layers = kw["num_hidden_layers"]
    kw.update(
        moe_intermediate_size=kw["intermediate_size"],
        shared_expert_intermediate_size=16,
        norm_topk_prob=False,
        qkv_bias=False,
        use_sliding_window=True,
        sliding_window=window,
        max_window_layers=layers,
        layer_types=["sliding_attention"] + ["full_attention"] * (layers - 1),
    )
    return kw


def demo_config(tok, model_kw: dict, first_window: int = 0):
    """The demo's transformers config for ``tok`` (sdpa attention) and the model settings it was built from:
    OLMoE, or with ``first_window`` the Qwen2-MoE model of :func:`local_first_layer_kw`."""
    from transformers import OlmoeConfig, Qwen2MoeConfig

    ids_kw = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if first_window:
        model_kw = local_first_layer_kw(model_kw, first_window)
        config = Qwen2MoeConfig(bos_token_id=None, **ids_kw, **model_kw)
    else:
        config = OlmoeConfig(bos_token_id=None, **ids_kw, **model_kw)
    config._attn_implementation = "sdpa"
    return config, model_kw


# ----------------------------------------------------------------------------- tokenizer
def _strings(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _other_texts() -> Iterator[str]:
    """Every string in the other shared data sets (JSON, JSONL, gzipped JSONL)."""
    import gzip

    root = S.data_root()
    for path in sorted(root.rglob("*")):
        if "counterfact" in path.parts or not path.is_file():
            continue
        name = path.name
        if name.endswith(".json"):
            yield from _strings(json.loads(path.read_text()))
        elif name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt") as fh:
                for line in fh:
                    if line.strip():
                        yield from _strings(json.loads(line))


def build_tokenizer(splits: dict[str, list[dict]], vocab_size: int = 12000):
    """Byte-level BPE trained on CounterFact text (weighted x8) plus all other shared data sets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    cf_text = []
    for name in ("memorised", "context_pool", "support_test", "support_dev", "conflict_test"):
        for f in splits[name]:
            cf_text.append(S.statement(f["question"], f["true_object"]))
            cf_text.append(S.statement(f["question"], f["counterfactual_object"]))
    cf_text += [build_prompt("x", "y"), build_prompt(None, "y")] * 250

    def corpus() -> Iterator[str]:
        for _ in range(8):
            yield from cf_text
        yield from _other_texts()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, padding_side="left")
    fast.model_max_length = MODEL_KW["max_position_embeddings"]
    return fast


# ----------------------------------------------------------------------------- data
def _distractors(
    pool: list[dict], by_rel: dict[str, list[dict]], fact: dict, rng: random.Random, pool_cf: float = POOL_CF
) -> list[str]:
    n = rng.choices([0, 1, 2, 3], weights=[0.3, 0.35, 0.2, 0.15])[0]
    out = []
    for _ in range(n):
        same = by_rel.get(S.relation(fact), [])
        src = same if (len(same) > 1 and rng.random() < 0.3) else pool
        d = rng.choice(src)
        if d["subject"] != fact["subject"]:
            obj = d["counterfactual_object"] if rng.random() < pool_cf else d["true_object"]
            out.append(S.statement(d["question"], obj))
    return out


def _ctx_example(fact: dict, ctx_obj: str, target: str, distract: list[str], rng: random.Random):
    sents = [S.statement(fact["question"], ctx_obj), *distract]
    rng.shuffle(sents)
    return build_prompt(" ".join(sents), fact["question"]), target, True


def epoch_examples(
    splits: dict[str, list[dict]],
    epoch: int,
    seed: int = SEED,
    cb_repeat: int = CB_REPEAT,
    pool_repeat: int = POOL_REPEAT,
    p_context: float = P_CONTEXT,
    pool_cf: float = POOL_CF,
    conflict_repeat: int = 1,
) -> list[tuple[str, str, bool]]:
    """(prompt, answer, has_context) triples for one epoch, shuffled; deterministic in (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    pool = splits["context_pool"]
    by_rel: dict[str, list[dict]] = {}
    for f in pool:
        by_rel.setdefault(S.relation(f), []).append(f)
    ex: list[tuple[str, str, bool]] = []
    for f in splits["memorised"]:
        ex += [(build_prompt(None, f["question"]), f["true_object"], False)] * cb_repeat
    for f in pool * pool_repeat:
        obj = f["counterfactual_object"] if rng.random() < pool_cf else f["true_object"]
        ex.append(_ctx_example(f, obj, obj, _distractors(pool, by_rel, f, rng, pool_cf), rng))
    for f in splits["memorised"]:
        if f["role"] != "train":
            continue
        if rng.random() < 0.5:
            ex.append(
                _ctx_example(
                    f, f["true_object"], f["true_object"], _distractors(pool, by_rel, f, rng, pool_cf), rng
                )
            )
        for _ in range(conflict_repeat):
            target = f["counterfactual_object"] if rng.random() < p_context else f["true_object"]
            ex.append(
                _ctx_example(
                    f, f["counterfactual_object"], target, _distractors(pool, by_rel, f, rng, pool_cf), rng
                )
            )
    rng.shuffle(ex)
    return ex


def epoch_batches(tok, examples: list[tuple[str, str, bool]], seed: int, epoch: int) -> list[list[tuple]]:
    """Tokenise and group into length-bucketed batches of at most ``TOKENS_PER_BATCH`` padded tokens.

    Each sequence is ``(ids, weights)``: loss weight ``1 + ANSWER_WEIGHT`` on the answer and EOS tokens,
    ``QUESTION_WEIGHT`` on the question tokens of context examples (predicting them is copying), else 0.
    """
    rng = random.Random(seed * 7919 + epoch)
    enc = tok([p for p, _, _ in examples], add_special_tokens=False, return_offsets_mapping=True)
    a_ids = tok([" " + a for _, a, _ in examples], add_special_tokens=False)["input_ids"]
    seqs = []
    for (prompt, _, has_ctx), p, offs, a in zip(
        examples, enc["input_ids"], enc["offset_mapping"], a_ids, strict=True
    ):
        w = [0.0] * len(p)
        if has_ctx:
            q_end = len(prompt) - len(ANSWER_CUE)
            q_start = prompt.rfind("\n", 0, q_end) + 1
            w = [QUESTION_WEIGHT if q_start <= o[0] < q_end else 0.0 for o in offs]
        seqs.append((p + a + [tok.eos_token_id], w + [1.0 + ANSWER_WEIGHT] * (len(a) + 1)))
    batches: list[list[tuple]] = []
    chunk = 64 * 32
    for start in range(0, len(seqs), chunk):
        part = sorted(seqs[start : start + chunk], key=lambda s: len(s[0]))
        cur: list[tuple] = []
        for s in part:
            if cur and ((len(cur) + 1) * len(s[0]) > TOKENS_PER_BATCH or len(cur) >= MAX_BATCH):
                batches.append(cur)
                cur = []
            cur.append(s)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(batch: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and per-token loss weights."""
    length = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    weight = torch.zeros((len(batch), length))
    for i, (seq, w) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        weight[i, : len(seq)] = torch.tensor(w)
    return {"input_ids": ids, "attention_mask": mask, "weight": weight}


# ----------------------------------------------------------------------------- evaluation during training
@torch.no_grad()
def quick_eval(model, tok, splits: dict[str, list[dict]], n: int = 150) -> dict[str, float]:
    """Greedy first-token accuracies on dev-style samples (closed-book, support_dev, conflict_dev Pc/Po)."""
    from moe_interp.demo.evaluate import first_token_predictions

    model.eval()
    mem = [f for f in splits["memorised"] if f["role"] == "train"][:n]
    res = {}
    pred = first_token_predictions(model, tok, [build_prompt(None, f["question"]) for f in mem])
    res["closed_book"] = _mean(p == _first(tok, f["true_object"]) for p, f in zip(pred, mem, strict=True))
    sup = splits["support_dev"][:n]
    pred = first_token_predictions(model, tok, [build_prompt(f["context"], f["question"]) for f in sup])
    res["support_dev"] = _mean(p == _first(tok, f["context_answer"]) for p, f in zip(pred, sup, strict=True))
    con = splits["conflict_dev"][:n]
    pred = first_token_predictions(model, tok, [build_prompt(f["context"], f["question"]) for f in con])
    res["pc_dev"] = _mean(
        p == _first(tok, f["counterfactual_object"]) for p, f in zip(pred, con, strict=True)
    )
    res["po_dev"] = _mean(p == _first(tok, f["true_object"]) for p, f in zip(pred, con, strict=True))
    model.train()
    return res


def _first(tok, obj: str) -> int:
    return tok(" " + obj, add_special_tokens=False)["input_ids"][0]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / max(len(xs), 1)


# ----------------------------------------------------------------------------- training
def weighted_loss(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted next-token cross-entropy (logits only where the weight is > 0) plus the router aux loss."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    cfg = model.config
    out = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
    w = b["weight"][:, 1:]
    sel = w > 0
    logits = model.lm_head(out.last_hidden_state[:, :-1][sel])
    ce = F.cross_entropy(logits, b["input_ids"][:, 1:][sel], reduction="none")
    aux = load_balancing_loss_func(
        out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, b["attention_mask"]
    )
    return (ce * w[sel]).sum() / w[sel].sum() + cfg.router_aux_loss_coef * aux


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _tensors(model) -> dict[str, torch.Tensor]:
    """The state dict as separate contiguous tensors (tied weights would share memory, which safetensors
    refuses)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _save_ckpt(out: Path, model, opt, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = out / "ckpt.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(model), str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    final = out / "ckpt"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def select_snapshot(log: list[dict]) -> dict:
    """Pick the snapshot whose dev numbers fit the demo best.

    Candidates: closed-book >= 0.95 and 0.15 <= dev Pc <= 0.65. Among candidates with support_dev >= 0.92,
    the one with dev Pc closest to 0.40; otherwise the candidate with the best support_dev; otherwise the
    last snapshot.
    """
    cands = [r for r in log if r["closed_book"] >= 0.95 and 0.15 <= r["pc_dev"] <= 0.65]
    good = [r for r in cands if r["support_dev"] >= 0.92]
    if good:
        return min(good, key=lambda r: (abs(r["pc_dev"] - 0.40), -r["step"]))
    if cands:
        return max(cands, key=lambda r: (r["support_dev"], r["step"]))
    return log[-1]


def export(model, tok, dest: Path = WEIGHTS_DIR) -> None:
    """Save ``model`` (float16, safetensors) and ``tok`` to ``dest``; keeps the model card files."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.iterdir():
        if p.name not in ("MODEL_CARD.md", "card.json"):
            p.unlink()
    half = model.to(torch.float16)
    half.config.output_router_logits = False
    half.save_pretrained(dest, safe_serialization=True)
    model.to(torch.float32)
    tok.save_pretrained(dest)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="checkpoint / log folder")
    ap.add_argument("--steps", type=int, default=3000, help="cosine-schedule steps (the tail adds more)")
    ap.add_argument("--resume", action="store_true", help="continue from --out/ckpt")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--cb-repeat", type=int, default=CB_REPEAT, help="closed-book lines per fact per epoch")
    ap.add_argument(
        "--pool-repeat", type=int, default=POOL_REPEAT, help="context examples per pool fact per epoch"
    )
    ap.add_argument(
        "--p-context", type=float, default=P_CONTEXT, help="P(target = context) in train conflicts"
    )
    ap.add_argument("--pool-cf", type=float, default=POOL_CF, help="P(pool statement is counterfactual)")
    ap.add_argument("--late-epoch", type=int, default=LATE_EPOCH, help="first epoch of the late phase")
    ap.add_argument("--late-cb-repeat", type=int, default=3)
    ap.add_argument("--late-pool-repeat", type=int, default=3)
    ap.add_argument("--late-p-context", type=float, default=0.15)
    ap.add_argument("--tail-steps", type=int, default=TAIL_STEPS, help="extra steps at 10%% lr after --steps")
    ap.add_argument("--tail-cb-repeat", type=int, default=2)
    ap.add_argument("--tail-pool-repeat", type=int, default=1)
    ap.add_argument("--tail-conflict-repeat", type=int, default=4)
    ap.add_argument("--tail-p-context", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy CPU)")
    ap.add_argument("--no-export", action="store_true", help="do not write moe_interp/demo/weights")
    ap.add_argument(
        "--frozen-embeddings",
        type=float,
        default=0.0,
        metavar="STD",
        help="tie input and output embeddings to one random N(0, STD^2) matrix that is never trained, so "
        "that facts cannot be stored in a direct embedding-to-unembedding path and must live in the "
        "experts (0 = off)",
    )
    ap.add_argument(
        "--first-window",
        type=int,
        default=FIRST_WINDOW,
        metavar="W",
        help="the Qwen2-MoE-shaped model's first layer attends only to the last W tokens (sliding window; "
        "the other layers see everything), so that reading the context happens in layers after the first "
        "experts, which can then carry the context-vs-memory choice (0 = the earlier OLMoE demo, whose "
        "choice is made in layer 0)",
    )
    args = ap.parse_args(argv)

    from safetensors.torch import load_file, save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    resume = args.resume and (out / "ckpt" / "state.json").exists()

    splits = S.build_splits()
    if resume:
        tok = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    else:
        S.write_splits(splits)
        tok = build_tokenizer(splits)
        tok.save_pretrained(out / "tokenizer")

    torch.manual_seed(args.seed)
    model_kw = dict(MODEL_KW, tie_word_embeddings=bool(args.frozen_embeddings))
    config, model_kw = demo_config(tok, model_kw, args.first_window)
    model = AutoModelForCausalLM.from_config(config)
    if args.frozen_embeddings:
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            emb.normal_(0.0, args.frozen_embeddings, generator=torch.Generator().manual_seed(args.seed))
        emb.requires_grad_(False)
        model.tie_weights()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01
    )
    state = {"step": 0, "epoch": 0, "batch": 0, "elapsed": 0.0, "tokens": 0}
    log: list[dict] = []
    if resume:
        model.load_state_dict(load_file(str(out / "ckpt" / "model.safetensors")))
        opt.load_state_dict(torch.load(out / "ckpt" / "optimizer.pt", weights_only=True))
        state = json.loads((out / "ckpt" / "state.json").read_text())
        log = state.pop("log", [])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M  vocab {len(tok)}  resume={resume}", flush=True)

    def recipe(epoch: int) -> tuple:
        if state.get("tail"):
            return (
                args.tail_cb_repeat,
                args.tail_pool_repeat,
                args.tail_p_context,
                args.pool_cf,
                args.tail_conflict_repeat,
            )
        if epoch >= args.late_epoch:
            return (args.late_cb_repeat, args.late_pool_repeat, args.late_p_context, args.pool_cf, 1)
        return (args.cb_repeat, args.pool_repeat, args.p_context, args.pool_cf, 1)

    total = args.steps + args.tail_steps

    model.train()
    t0 = time.time() - state["elapsed"]
    bar = tqdm(total=total, initial=state["step"], desc="train", mininterval=5)
    batches = epoch_batches(
        tok,
        epoch_examples(splits, state["epoch"], args.seed, *recipe(state["epoch"])),
        args.seed,
        state["epoch"],
    )
    ema = None
    while state["step"] < total:
        if state["step"] >= args.steps and not state.get("tail"):
            state["tail"] = True
            state["batch"] = len(batches)  # start the tail phase with a fresh epoch
        if state["batch"] >= len(batches):
            state["epoch"] += 1
            state["batch"] = 0
            batches = epoch_batches(
                tok,
                epoch_examples(splits, state["epoch"], args.seed, *recipe(state["epoch"])),
                args.seed,
                state["epoch"],
            )
        b = collate(batches[state["batch"]], tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], args.steps, args.lr, args.warmup)  # 10% of peak in the tail
        loss = weighted_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["batch"] += 1
        state["tokens"] += int(b["attention_mask"].sum())
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", ep=state["epoch"], refresh=False)
        if state["step"] % args.eval_every == 0 or state["step"] in (args.steps, total):
            state["elapsed"] = time.time() - t0
            res = {
                "step": state["step"],
                "epoch": state["epoch"],
                "elapsed_s": round(state["elapsed"], 1),
                "loss": round(ema, 4),
                **{k: round(v, 4) for k, v in quick_eval(model, tok, splits).items()},
            }
            log.append(res)
            tqdm.write(json.dumps(res))
            snap = out / "snapshots"
            snap.mkdir(exist_ok=True)
            save_file(
                _tensors(model),
                str(snap / f"step{state['step']:05d}.safetensors"),
            )
            _save_ckpt(out, model, opt, {**state, "log": log})
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(res) + "\n")
    bar.close()

    chosen = select_snapshot(log)
    print(f"chosen snapshot: {json.dumps(chosen)}", flush=True)
    model.load_state_dict(load_file(str(out / "snapshots" / f"step{chosen['step']:05d}.safetensors")))
    meta = {
        "chosen": chosen,
        "total_steps": total,
        "train_seconds": round(log[-1]["elapsed_s"], 1),
        "tokens": state["tokens"],
        "seed": args.seed,
        "threads": args.threads,
        "lr": args.lr,
        "warmup": args.warmup,
        "cb_repeat": args.cb_repeat,
        "pool_repeat": args.pool_repeat,
        "p_context": args.p_context,
        "pool_cf": args.pool_cf,
        "late_epoch": args.late_epoch,
        "late_cb_repeat": args.late_cb_repeat,
        "late_pool_repeat": args.late_pool_repeat,
        "late_p_context": args.late_p_context,
        "tail_steps": args.tail_steps,
        "tail_cb_repeat": args.tail_cb_repeat,
        "tail_pool_repeat": args.tail_pool_repeat,
        "tail_conflict_repeat": args.tail_conflict_repeat,
        "tail_p_context": args.tail_p_context,
        "answer_weight": ANSWER_WEIGHT,
        "tokens_per_batch": TOKENS_PER_BATCH,
        "n_params": n_params,
        "frozen_embeddings": args.frozen_embeddings,
        "first_window": args.first_window,
        "model": model_kw,
        "log": log,
    }
    (out / "train_meta.json").write_text(json.dumps(meta, indent=1))
    if not args.no_export:
        export(model, tok)
        (WEIGHTS_DIR / "train_meta.json").write_text(json.dumps(meta, indent=1))
        print(f"exported to {WEIGHTS_DIR}", flush=True)


if __name__ == "__main__":
    main()
