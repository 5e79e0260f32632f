"""The training engine: Hugging Face ``accelerate`` around trainable deltas (:mod:`moe_interp.ceft.deltas`).

``train(model, tokenizer, train, dev, method=..., out=...)`` trains one
:class:`~moe_interp.ceft.targets.Method` on context-dependent QA with the answer-token-only loss of
:mod:`moe_interp.routerlens` (prompt = ``format_example``, target ``" " + answer`` + EOS; mean cross-entropy
over the answer tokens of the whole optimizer step). The same code runs single-process on CPU, under
``accelerate launch`` (DDP, several GPUs, FSDP / DeepSpeed configs) and with mixed precision or
gradient checkpointing.

Exactness across process counts: an optimizer step consumes ``batch_size`` examples (the global batch) in
``grad_accum`` micro-steps; each micro-step's ``batch_size / grad_accum`` examples are padded together to
one length and split evenly over the processes (accelerate ``split_batches=True``), and every process scales
its summed token loss by ``world_size * grad_accum / tokens_in_step`` so that DDP's gradient mean is the
global per-token mean. One process and ``N`` processes with the same global batch therefore see identical
padded rows and differ only in floating-point summation order.

Output folder (``out``):

- ``deltas.safetensors``: the trained deltas only (``"<param>::delta"`` or ``::lora_A`` / ``::lora_B``),
  best dev loss (or last step without a dev set); ``deltas.json``: method, targets (exact slices),
  trainable-parameter count, config, data fingerprint and loss history. Written last (= done).
- ``checkpoint/``: ``accelerator.save_state`` (deltas instead of model weights, optimizer, scheduler, RNG)
  + ``progress.json`` + ``best.safetensors``; swapped in atomically every ``checkpoint_every`` steps. A
  rerun with the same arguments resumes after a kill and ends with the same deltas as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from moe_interp.answer_loss import (
    AnswerLossExample,
    check_run_settings,
    encode_answer_loss,
    fingerprint,
    pad_id,
)
from moe_interp.atomic import atomic_write
from moe_interp.ceft.deltas import DeltaSet, attached_deltas, describe
from moe_interp.ceft.targets import DeltaTarget, Method, count_parameters, count_trainable, resolve_targets
from moe_interp.data.example import QAExample
from moe_interp.errors import InputError
from moe_interp.evaluation import left_pad, write_json_atomic
from moe_interp.routerlens.data import to_examples
from moe_interp.signature import forward_accepts

DELTAS_FILE = "deltas.safetensors"
META_FILE = "deltas.json"
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class CEFTConfig:
    """Training hyper-parameters shared by all methods (same data, same budget).

    Attributes:
        lr: peak AdamW learning rate (a :class:`Method` may override it). epochs: passes over the data.
        batch_size: examples per optimizer step over all processes (the global batch); the remainder of
            each epoch's shuffled order is dropped.
        grad_accum: micro-steps per optimizer step; ``batch_size`` must be a multiple of
            ``grad_accum * num_processes``.
        max_length: longest sequence; prompts lose tokens from the left, the answer is kept.
        warmup_ratio: linear warm-up fraction, then cosine decay to 0.
        weight_decay: AdamW decoupled weight decay on the *deltas* (pulls towards the pretrained weights).
        max_grad_norm: gradient-norm clip over the trainable tensors (``None``: none).
        eval_every: dev-loss evaluation every this many steps (``None``: each epoch); the best is kept.
        checkpoint_every: save the resume state every this many optimizer steps.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (accelerate autocast; deltas stay float32).
        gradient_checkpointing: recompute activations in backward (runs the model in train mode).
        find_unused_parameters: DDP setting (only needed for models that skip parameters in forward).
    """

    lr: float = 1e-4
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 300
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None
    checkpoint_every: int = 50
    template: str = "paper"
    append_eos: bool = True
    eval_batch_size: int = 32
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "grad_accum", "max_length", "checkpoint_every", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"CEFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1:
            raise InputError(
                f"CEFTConfig: need lr > 0 and 0 <= warmup_ratio < 1 (got {self.lr}, {self.warmup_ratio})"
            )
        if self.batch_size % self.grad_accum:
            raise InputError(
                f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}"
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise InputError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.eval_every is not None and self.eval_every < 1:
            raise InputError(f"CEFTConfig.eval_every must be >= 1 or None, got {self.eval_every}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CEFTConfig:
        d = dict(d)
        d["adam_betas"] = tuple(d.get("adam_betas", (0.9, 0.999)))
        return cls(**d)


@dataclass
class CEFTResult:
    """What :func:`train` produced.

    Attributes:
        targets: the trained slices; ``deltas``: ``"<param>::<suffix>"`` -> float32 CPU tensor.
        trainable: exact number of trainable scalars; ``total``: all parameters of the model.
        history: one dict per evaluation (step, epoch, train_loss, lr, dev_loss); with a dev set the first
            entry (step 0) is the untrained model's dev loss.
    """

    method: Method
    config: CEFTConfig
    targets: list[DeltaTarget]
    deltas: dict[str, torch.Tensor]
    trainable: int
    total: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    best_dev_loss: float = math.nan
    seconds: float = math.nan
    path: Path | None = None

    @property
    def source(self) -> tuple[list[DeltaTarget], dict[str, torch.Tensor]]:
        """``(targets, deltas)`` for :func:`~moe_interp.ceft.applied_deltas`."""
        return self.targets, self.deltas


# ------------------------------------------------------------------------------------------ data
class _Slots(torch.utils.data.Dataset):
    """Slot ``k`` = position ``k % G`` of global micro-batch ``k // G`` (``G`` = examples per micro-step over
    all processes). Each slot carries its micro-batch's pad length, label width and the step's token count,
    so every process pads exactly as a single process would."""

    def __init__(self, enc: Sequence[AnswerLossExample], order: list[int], micro: int, accum: int):
        self.enc, self.order, self.micro = enc, order, micro
        n_micro = len(order) // micro
        self.length = [0] * n_micro
        self.width = [0] * n_micro
        self.norm = [0] * n_micro
        for m in range(n_micro):
            rows = [enc[i] for i in order[m * micro : (m + 1) * micro]]
            self.length[m] = max(len(e.head) + len(e.tail) for e in rows)
            self.width[m] = max(len(e.tail) for e in rows)
        for s in range(n_micro // accum):
            tokens = sum(len(enc[i].tail) for i in order[s * accum * micro : (s + 1) * accum * micro])
            for m in range(s * accum, (s + 1) * accum):
                self.norm[m] = tokens

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> dict[str, Any]:
        m = k // self.micro
        e = self.enc[self.order[k]]
        return {"e": e, "length": self.length[m], "width": self.width[m], "norm": self.norm[m]}


def _collate(pad: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length, width = items[0]["length"], items[0]["width"]
        ids = torch.full((len(items), length), pad, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for r, it in enumerate(items):
            seq = it["e"].head + it["e"].tail
            ids[r, length - len(seq) :] = torch.tensor(seq)
            mask[r, length - len(seq) :] = 1
            labels[r, width - len(it["e"].tail) :] = torch.tensor(it["e"].tail)
        norm = torch.tensor([float(it["norm"]) for it in items], dtype=torch.float64)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "norm": norm}

    return collate


class _Batches(torch.utils.data.Sampler[list[int]]):
    def __init__(self, n_slots: int, size: int, start: int):
        self.n, self.size, self.start = n_slots, size, start
        self.batch_size = size  # accelerate splits batches of this size over the processes
        self.drop_last = True

    def __iter__(self) -> Iterator[list[int]]:
        for m in range(self.start, self.n // self.size):
            yield list(range(m * self.size, (m + 1) * self.size))

    def __len__(self) -> int:
        return self.n // self.size - self.start


def _schedule(n: int, cfg: CEFTConfig) -> list[int]:
    """The global example order over all epochs (each epoch: a seeded permutation, remainder dropped)."""
    per_epoch = (n // cfg.batch_size) * cfg.batch_size
    order: list[int] = []
    for epoch in range(cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order += torch.randperm(n, generator=g).tolist()[:per_epoch]
    return order


def _loss_sum(model: nn.Module, batch: Mapping[str, torch.Tensor], keep_arg: bool) -> torch.Tensor:
    """Summed answer-token cross-entropy of a left-padded batch; labels ``[B, K]`` right-aligned."""
    mask, labels = batch["attention_mask"], batch["labels"]
    width = labels.shape[1]
    kwargs: dict[str, Any] = dict(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=False,
    )
    if keep_arg:
        kwargs["logits_to_keep"] = width + 1
    logits = model(**kwargs).logits[:, -(width + 1) : -1].float()
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), reduction="sum"
    )


# ------------------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(
    accelerator, folder: Path, progress: dict[str, Any], best: dict[str, torch.Tensor] | None
) -> None:
    """``accelerator.save_state`` into ``checkpoint.tmp`` then an atomic swap to ``checkpoint``."""
    tmp, final, old = folder / f"{CHECKPOINT}.tmp", folder / CHECKPOINT, folder / f"{CHECKPOINT}.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        write_json_atomic(tmp / "progress.json", progress)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _find_checkpoint(folder: Path) -> Path | None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):  # .old survives a kill between the two renames
        c = folder / name
        if (c / "progress.json").is_file():
            return c
    return None


def load_result(path: str | os.PathLike[str]) -> CEFTResult:
    """Read a finished CEFT output folder without the model or data."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise InputError(f"{path} holds no finished CEFT run ({META_FILE} missing)")
    meta = json.loads((path / META_FILE).read_text())
    return CEFTResult(
        method=Method.from_dict(meta["method"]),
        config=CEFTConfig.from_dict(meta["config"]),
        targets=[DeltaTarget.from_dict(t) for t in meta["targets"]],
        deltas=load_file(str(path / DELTAS_FILE)),
        trainable=int(meta["trainable"]),
        total=int(meta["total"]),
        history=meta.get("history", []),
        best_step=int(meta.get("best_step", 0)),
        best_dev_loss=math.nan if meta.get("best_dev_loss") is None else float(meta["best_dev_loss"]),
        seconds=float(meta.get("seconds", math.nan)),
        path=path,
    )


# ------------------------------------------------------------------------------------------ entry point
def train(
    model: nn.Module,
    tokenizer,
    train: Sequence[QAExample | Mapping[str, Any]],
    dev: Sequence[QAExample | Mapping[str, Any]] | None = None,
    *,
    method: Method,
    config: CEFTConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> CEFTResult:
    """Train ``method``'s deltas on ``train`` (dev loss on ``dev`` picks the best evaluation).

    The caller's model is modified only while this runs (parametrizations, ``requires_grad`` flags, train /
    eval mode, gradient checkpointing); on return every parameter is the original object with its original
    values, bit for bit. Use :func:`~moe_interp.ceft.applied_deltas` with ``result.source`` (or
    ``result.path``) to evaluate the trained model. Run under ``accelerate launch`` for several processes.

    Args:
        method: what to train (:func:`~moe_interp.ceft.ceft`, :func:`full_fine_tuning`, ...).
        out: output folder (resumable; a finished folder is loaded instead of retrained).
        callback: ``callback(step, logs)`` after every optimizer step (main process only).

    Raises:
        InputError: bad config / data, a folder holding another run, fewer examples than one batch.
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from transformers import get_cosine_schedule_with_warmup

    cfg = config or CEFTConfig()
    lr = method.lr if method.lr is not None else cfg.lr
    enc = dict(max_length=cfg.max_length, template=cfg.template, append_eos=cfg.append_eos)
    train_enc = encode_answer_loss(tokenizer, to_examples(train), **enc, what="train")
    dev_enc = encode_answer_loss(tokenizer, to_examples(dev), **enc, what="dev") if dev else []
    if len(train_enc) < cfg.batch_size:
        raise InputError(f"{len(train_enc)} training examples are fewer than one batch ({cfg.batch_size})")
    targets = resolve_targets(model, method)
    meta = {
        "method": method.to_dict(),
        "config": cfg.to_dict(),
        "lr": lr,
        "train": {"n": len(train_enc), "fingerprint": fingerprint(train_enc)},
        "dev": {"n": len(dev_enc), "fingerprint": fingerprint(dev_enc)},
        "model": {"type": model.config.model_type, "parameters": count_parameters(model)},
        "targets": describe(targets),
        "trainable": count_trainable(targets),
    }

    _allow_precision_change(cfg.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )
    world = accelerator.num_processes
    micro = cfg.batch_size // cfg.grad_accum  # examples per micro-step, all processes
    if micro % world:
        raise InputError(
            f"batch_size {cfg.batch_size} / grad_accum {cfg.grad_accum} = {micro} examples per micro-step "
            f"cannot be split over {world} processes"
        )
    path = Path(out) if out is not None else None
    if path is not None:
        if (path / META_FILE).is_file() and (path / DELTAS_FILE).is_file():
            check_run_settings(path / "run.json", meta, "CEFT", write=accelerator.is_main_process)
            return load_result(path)
        if accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        check_run_settings(path / "run.json", meta, "CEFT", write=accelerator.is_main_process)

    order = _schedule(len(train_enc), cfg)
    steps_per_epoch = len(train_enc) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    state: dict[str, Any] = {"step": 0, "history": [], "best_step": 0, "best_loss": math.inf, "running": []}
    best: dict[str, torch.Tensor] | None = None
    ckpt = _find_checkpoint(path) if path is not None else None
    if ckpt is not None:
        state.update(json.loads((ckpt / "progress.json").read_text()))
        state["best_loss"] = math.inf if state["best_loss"] is None else float(state["best_loss"])
        if (ckpt / "best.safetensors").is_file():
            best = load_file(str(ckpt / "best.safetensors"))

    keep_arg = forward_accepts(model, "logits_to_keep")
    pad = pad_id(tokenizer)
    was_training = model.training
    had_gc = bool(getattr(model, "is_activation_checkpointing", False))
    had_grads_hook = getattr(model, "_require_grads_hook", None) is not None
    start = time.perf_counter()
    try:
        with attached_deltas(model, targets, seed=cfg.seed) as deltas:
            if cfg.gradient_checkpointing:
                _checkpointing(model, True)
                model.train()  # transformers checkpoints only in train mode
            else:
                model.eval()  # deterministic: no dropout / router jitter
            params = deltas.parameters()
            optimizer = torch.optim.AdamW(params, lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
            scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)
            slots = _Slots(train_enc, order, micro, cfg.grad_accum)
            loader = torch.utils.data.DataLoader(
                slots,
                batch_sampler=_Batches(len(slots), micro, state["step"] * cfg.grad_accum),
                collate_fn=_collate(pad),
            )
            wrapped, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
            hooks = _register_hooks(accelerator, deltas)
            try:
                if ckpt is not None:
                    accelerator.load_state(str(ckpt))
                best = _loop(
                    accelerator,
                    wrapped,
                    model,
                    deltas,
                    optimizer,
                    scheduler,
                    loader,
                    dev_enc,
                    cfg,
                    state,
                    best,
                    total,
                    steps_per_epoch,
                    keep_arg,
                    pad,
                    path,
                    progress,
                    callback,
                )
            finally:
                for h in hooks:
                    h.remove()
            final = best if best is not None else deltas.state_dict()
            accelerator.wait_for_everyone()
    finally:
        if cfg.gradient_checkpointing and not had_gc:
            _checkpointing(model, False)
            if not had_grads_hook and getattr(model, "_require_grads_hook", None) is not None:
                model.disable_input_require_grads()  # enabling checkpointing added this hook
        model.train(was_training)
        accelerator.free_memory()
    seconds = time.perf_counter() - start
    result = CEFTResult(
        method=method,
        config=cfg,
        targets=targets,
        deltas=final,
        trainable=meta["trainable"],
        total=count_parameters(model),
        history=state["history"],
        best_step=int(state["best_step"]),
        best_dev_loss=float(state["best_loss"]) if dev_enc else math.nan,
        seconds=seconds,
        path=path,
    )
    if path is not None and accelerator.is_main_process:
        atomic_write(path / DELTAS_FILE, lambda tmp: save_file(final, str(tmp)))
        write_json_atomic(
            path / META_FILE,
            {
                **meta,
                "total": result.total,
                "best_step": result.best_step,
                "best_dev_loss": None if math.isnan(result.best_dev_loss) else result.best_dev_loss,
                "history": state["history"],
                "seconds": seconds,
                "num_processes": world,
            },
        )
        for name in (CHECKPOINT, f"{CHECKPOINT}.tmp", f"{CHECKPOINT}.old"):  # finished: no resume needed
            shutil.rmtree(path / name, ignore_errors=True)
    accelerator.wait_for_everyone()
    return result


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing on / off (transformers 5 names, older names as fallback)."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()


def _allow_precision_change(mixed_precision: str) -> None:
    """accelerate keeps one process-wide AcceleratorState; in a single process, let successive
    :func:`train` calls use different ``mixed_precision`` settings (distributed runs keep theirs)."""
    from accelerate.state import AcceleratorState, PartialState

    shared = AcceleratorState._shared_state
    if shared and PartialState().num_processes == 1:
        current = str(shared.get("_mixed_precision", shared.get("mixed_precision", mixed_precision)))
        if current != mixed_precision:
            AcceleratorState._reset_state()


def _register_hooks(accelerator, deltas: DeltaSet) -> list[Any]:
    """Checkpoints hold the deltas instead of the model's weights."""

    def save_hook(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        for i in range(len(weights)):
            weights[i] = deltas.state_dict()

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        files = sorted(Path(input_dir).glob("model*.safetensors"))
        if not files:
            raise InputError(f"checkpoint {input_dir} holds no delta file")
        deltas.load_state_dict(load_file(str(files[0])))
        models.clear()

    return [
        accelerator.register_save_state_pre_hook(save_hook),
        accelerator.register_load_state_pre_hook(load_hook),
    ]


@torch.no_grad()
def _dev_loss(
    accelerator, model: nn.Module, dev: Sequence[AnswerLossExample], cfg: CEFTConfig, keep: bool, pad: int
):
    """Mean answer-token loss on ``dev``; each process takes every ``world``-th length-sorted batch."""
    order = sorted(range(len(dev)), key=lambda i: len(dev[i].head) + len(dev[i].tail))
    batches = [order[s : s + cfg.eval_batch_size] for s in range(0, len(order), cfg.eval_batch_size)]
    device = accelerator.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in batches[accelerator.process_index :: accelerator.num_processes]:
        rows = [dev[i] for i in b]
        ids, mask = left_pad([e.head + e.tail for e in rows], pad)
        width = max(len(e.tail) for e in rows)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, e in enumerate(rows):
            labels[r, width - len(e.tail) :] = torch.tensor(e.tail)
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
        with accelerator.autocast():
            total[0] += float(_loss_sum(model, batch, keep))
        total[1] += sum(len(e.tail) for e in rows)
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def _loop(
    accelerator,
    wrapped,
    model,
    deltas: DeltaSet,
    optimizer,
    scheduler,
    loader,
    dev_enc,
    cfg: CEFTConfig,
    state: dict[str, Any],
    best,
    total: int,
    steps_per_epoch: int,
    keep_arg: bool,
    pad: int,
    path: Path | None,
    show: bool,
    callback,
):
    world = accelerator.num_processes
    params = deltas.parameters()

    def evaluate_dev() -> float:
        with parametrize.cached():
            return _dev_loss(accelerator, model, dev_enc, cfg, keep_arg, pad)

    def checkpoint() -> None:
        if path is not None:
            _save_checkpoint(accelerator, path, state, best)

    if state["step"] == 0 and not state["history"] and dev_enc:  # reference only, not a candidate
        state["history"].append({"step": 0, "epoch": 0.0, "dev_loss": evaluate_dev()})
    bar = tqdm(
        total=total,
        initial=state["step"],
        desc="ceft",
        unit="step",
        disable=not (show and accelerator.is_main_process),
    )
    micro_loss = torch.zeros((), dtype=torch.float64)
    try:
        for batch in loader:
            with accelerator.accumulate(wrapped):
                cache = parametrize.cached() if not cfg.gradient_checkpointing else nullcontext()
                with cache:
                    loss_sum = _loss_sum(wrapped, batch, keep_arg)
                    scale = world * cfg.grad_accum / float(batch["norm"][0])
                    accelerator.backward(loss_sum * scale)
                micro_loss += float(loss_sum.detach()) / float(batch["norm"][0])
                if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step_loss = float(accelerator.reduce(micro_loss.to(accelerator.device), reduction="sum"))
            micro_loss.zero_()
            state["step"] += 1
            step = state["step"]
            state["running"].append(step_loss)
            logs: dict[str, Any] = {"step": step, "loss": step_loss}
            due = step % cfg.eval_every == 0 if cfg.eval_every else step % steps_per_epoch == 0
            if due or step == total:
                record = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "train_loss": sum(state["running"]) / len(state["running"]),
                    "lr": scheduler.get_last_lr()[0],
                }
                state["running"] = []
                if dev_enc:
                    record["dev_loss"] = evaluate_dev()
                    if record["dev_loss"] < state["best_loss"]:
                        best = deltas.state_dict()
                        state["best_loss"], state["best_step"] = record["dev_loss"], step
                else:
                    best, state["best_step"] = deltas.state_dict(), step
                state["history"].append(record)
                logs.update(record)
                bar.set_postfix(dev=f"{record.get('dev_loss', math.nan):.4f}")
            if due or step == total or step % cfg.checkpoint_every == 0:
                checkpoint()
            bar.update(1)
            if callback is not None and accelerator.is_main_process:
                callback(step, logs)
    finally:
        bar.close()
    return best
