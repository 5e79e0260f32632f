"""Experiment behind the demo notes of issues 5 and 7: can routing be made to decide context vs memory?

Continues training the shipped demo model on its own training mixture while counterfactual-context examples
get a hidden mode: "read" (target = the context's object) forces ``--n-read`` designated experts per layer in
``--layers`` to be selected at every position (they take over the displaced experts' slot weights), "recall"
(target = the memorised object) blocks them. Every ``--eval-every`` steps it prints Pc / Po on
``conflict_dev`` with free routing, with the read experts forced and with them blocked, and how often the
read experts are selected. If the forced and blocked Pc stay equal, experts in those layers do not carry the
choice and router tuning cannot move it.

    python experiments/plant_routing.py --out runs/plant --p-read 0.5 --steps 800

Measured (shipped demo, 1 CPU thread): at the start forcing vs blocking changes Pc by < 2 points; after 800
steps (all parameters, lr 1e-3, p_read 0.3 or 0.5) still none (0.72 / 0.72); layer 3 only on conflicts only
(lr 3e-3, 300 steps): 0.43 vs 0.34 while the training loss fell to 0.53 (memorising the training facts).
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_interp.demo import load_demo
from moe_interp.demo import splits as S
from moe_interp.demo import train as T
from moe_interp.prompts import ANSWER_CUE, build_prompt

ap = argparse.ArgumentParser()
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--steps", type=int, default=800)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--p-read", type=float, default=0.3)
ap.add_argument("--layers", default="1,2,3")
ap.add_argument("--n-read", type=int, default=2)
ap.add_argument("--conflict-repeat", type=int, default=4)
ap.add_argument("--bias", type=float, default=100.0)
ap.add_argument("--eval-every", type=int, default=200)
ap.add_argument("--cb", type=int, default=2)
ap.add_argument("--experts-only", action="store_true")
ap.add_argument("--pool", type=int, default=1)
args = ap.parse_args()
torch.set_num_threads(1)
out = args.out
out.mkdir(parents=True, exist_ok=True)
model, tok = load_demo()  # float32
splits = S.build_splits()
config = model.config
layers = [int(x) for x in args.layers.split(",")]
rng = random.Random(7)
E = config.num_experts
read = {l: sorted(rng.sample(range(E), args.n_read)) for l in layers}
print("read experts", read, flush=True)

BIAS = {"t": None}  # (tokens, E) selection bias or None


def make_forward(gate, layer):
    def fwd(hidden_states):
        h = hidden_states.reshape(-1, gate.hidden_dim)
        logits = F.linear(h, gate.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        natural, idx = torch.topk(probs, gate.top_k, dim=-1)
        b = BIAS["t"]
        if b is None:
            return logits, natural.to(logits.dtype), idx
        _, idx_b = torch.topk(probs + b[layer], gate.top_k, dim=-1)
        own = probs.gather(-1, idx_b)
        # experts forced in take over the displaced experts' slot weights (detached)
        forced = b[layer].gather(-1, idx_b) > 0
        top = torch.where(forced, natural.detach(), own)
        return logits, top.to(logits.dtype), idx_b

    return fwd


for l in layers:
    g = model.model.layers[l].mlp.gate
    g.forward = make_forward(g, l)


def examples(epoch):
    r = random.Random(1000 + epoch)
    pool = splits["context_pool"]
    by_rel = {}

    def _dis(f, r):
        return T._distractors(pool, by_rel, f, r)

    for f in pool:
        by_rel.setdefault(S.relation(f), []).append(f)
    ex = []
    for f in splits["memorised"]:
        ex += [(build_prompt(None, f["question"]), f["true_object"], False, 0)] * args.cb
    for f in pool * args.pool:
        obj = f["counterfactual_object"] if r.random() < 0.5 else f["true_object"]
        p, t, c = T._ctx_example(f, obj, obj, _dis(f, r), r)
        ex.append((p, t, c, 0))
    for f in splits["memorised"]:
        if f["role"] != "train":
            continue
        if r.random() < 0.5:
            p, t, c = T._ctx_example(
                f, f["true_object"], f["true_object"], T._distractors(pool, by_rel, f, r), r
            )
            ex.append((p, t, c, 0))
        for _ in range(args.conflict_repeat):
            mode = 1 if r.random() < args.p_read else 2
            target = f["counterfactual_object"] if mode == 1 else f["true_object"]
            p, t, c = T._ctx_example(
                f, f["counterfactual_object"], target, T._distractors(pool, by_rel, f, r), r
            )
            ex.append((p, t, c, mode))
    r.shuffle(ex)
    return ex


def batches(ex, epoch):
    r = random.Random(77 + epoch)
    enc = tok([e[0] for e in ex], add_special_tokens=False, return_offsets_mapping=True)
    a_ids = tok([" " + e[1] for e in ex], add_special_tokens=False)["input_ids"]
    seqs = []
    for (prompt, _, has_ctx, mode), p, offs, a in zip(
        ex, enc["input_ids"], enc["offset_mapping"], a_ids, strict=True
    ):
        w = [0.0] * len(p)
        if has_ctx:
            q_end = len(prompt) - len(ANSWER_CUE)
            q_start = prompt.rfind("\n", 0, q_end) + 1
            w = [T.QUESTION_WEIGHT if q_start <= o[0] < q_end else 0.0 for o in offs]
        seqs.append((p + a + [tok.eos_token_id], w + [1.0 + T.ANSWER_WEIGHT] * (len(a) + 1), mode))
    out_b = []
    for start in range(0, len(seqs), 2048):
        part = sorted(seqs[start : start + 2048], key=lambda s: len(s[0]))
        cur = []
        for s in part:
            if cur and ((len(cur) + 1) * len(s[0]) > T.TOKENS_PER_BATCH or len(cur) >= T.MAX_BATCH):
                out_b.append(cur)
                cur = []
            cur.append(s)
        if cur:
            out_b.append(cur)
    r.shuffle(out_b)
    return out_b


def bias_for(modes, length):
    """(layer -> (B*L, E)) selection bias."""
    res = {}
    for l in layers:
        b = torch.zeros(len(modes), E)
        for i, m in enumerate(modes):
            if m == 1:
                b[i, read[l]] = args.bias
            elif m == 2:
                b[i, read[l]] = -args.bias
        res[l] = b[:, None, :].expand(len(modes), length, E).reshape(-1, E)
    return res


@torch.no_grad()
def evaluate(n=150, split="conflict_dev"):
    model.eval()
    con = splits[split][:n] if split in splits else None
    res = {}
    prompts = [build_prompt(f["context"], f["question"]) for f in con]
    cf = [T._first(tok, f["counterfactual_object"]) for f in con]
    tr = [T._first(tok, f["true_object"]) for f in con]
    from moe_interp.demo.evaluate import first_token_predictions

    for name, mode in (("free", None), ("read", 1), ("recall", 2)):
        if mode is None:
            BIAS["t"] = None
            pred = first_token_predictions(model, tok, prompts)
        else:
            pred = []
            for i in range(0, len(prompts), 64):
                enc = tok(prompts[i : i + 64], return_tensors="pt", padding=True, add_special_tokens=False)
                BIAS["t"] = bias_for([mode] * enc["input_ids"].shape[0], enc["input_ids"].shape[1])
                pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                pred += model(**enc, position_ids=pos).logits[:, -1].argmax(-1).tolist()
            BIAS["t"] = None
        res[f"pc_{name}"] = sum(p == c for p, c in zip(pred, cf, strict=True)) / len(con)
        res[f"po_{name}"] = sum(p == c for p, c in zip(pred, tr, strict=True)) / len(con)
    # read-expert selection rate at the last prompt token and over all tokens (free routing)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    o = model(**enc, output_router_logits=True)
    m = enc["attention_mask"].reshape(-1).bool()
    for l in layers:
        lg = o.router_logits[l]
        idx = lg.topk(2, -1).indices
        hit = torch.isin(idx, torch.tensor(read[l])).any(-1)
        res[f"sel_all_L{l}"] = round(hit[m].float().mean().item(), 3)
        res[f"sel_last_L{l}"] = round(hit.reshape(len(prompts), -1)[:, -1].float().mean().item(), 3)
    q = T.quick_eval(model, tok, splits)
    res["closed_book"], res["support_dev"] = q["closed_book"], q["support_dev"]
    model.train()
    return {k: round(v, 3) for k, v in res.items()}


print("start", evaluate(), flush=True)
params = [p for n, p in model.named_parameters() if (not args.experts_only) or ".mlp.experts." in n]
print("trainable", sum(p.numel() for p in params), flush=True)
opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
step, epoch = 0, 0
model.train()
t0 = time.time()
while step < args.steps:
    for b in batches(examples(epoch), epoch):
        if step >= args.steps:
            break
        c = T.collate([(s[0], s[1]) for s in b], tok.pad_token_id)
        BIAS["t"] = bias_for([s[2] for s in b], c["input_ids"].shape[1])
        for g in opt.param_groups:
            g["lr"] = T.lr_at(step, args.steps, args.lr, 50)
        loss = T.weighted_loss(model, c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        BIAS["t"] = None
        step += 1
        if step % args.eval_every == 0:
            r = evaluate()
            r.update(step=step, loss=round(loss.item(), 3), t=round(time.time() - t0))
            print(json.dumps(r), flush=True)
    epoch += 1
# export plain model (original gate forward)
for l in layers:
    del model.model.layers[l].mlp.gate.forward
model.save_pretrained(out / "model", safe_serialization=True)
tok.save_pretrained(out / "model")
(out / "read.json").write_text(json.dumps({str(k): v for k, v in read.items()}))
print("done", flush=True)
