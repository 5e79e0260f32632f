"""Router tuning (RT): train only the routers of an MoE model on context-dependent QA.

Only the parameters of each MoE layer's router (``arch.moe_layers(model)[i].router``) are trained; every
other parameter and buffer stays frozen and bit-identical. The loss is the mean cross-entropy over the
answer tokens (``prompt = build_prompt(context, question)``, target ``" " + answer`` plus EOS) only.

The caller's model is never modified: the trainable router tensors live outside the model and enter the
forward pass through :func:`torch.func.functional_call` (pass ``inplace=True`` to load the best weights into
the model at the end). The model runs in eval mode during tuning (no dropout, no router jitter), so a run is
deterministic given its seed.

Output folder (``out``):

- ``router_weights.safetensors``: the best-dev-loss router weights only (LoRA deltas merged), names as in
  ``model.named_parameters()``; ``router_config.json``: the configuration and data fingerprint that
  produced them, with the loss history. Both written atomically, the JSON last (its presence = done).
- ``checkpoint/state.pt``: resume state (router tensors, optimizer, scheduler, RNG, best-so-far), written
  atomically every ``checkpoint_every`` steps and after each dev evaluation; read with
  ``torch.load(weights_only=True)``. A rerun with the same arguments resumes after a kill and ends with the
  same weights as an uninterrupted run. Deleted once the run has finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from moe_interp.answer_loss import (
    AnswerLossExample,
    check_run_settings,
    encode_answer_loss,
    fingerprint,
    pad_id,
)
from moe_interp.architectures import get_architecture
from moe_interp.atomic import atomic_write
from moe_interp.data.example import QAExample
from moe_interp.errors import InputError
from moe_interp.evaluation import left_pad, write_json_atomic
from moe_interp.hooks import ModelPatch
from moe_interp.routerlens.data import to_examples
from moe_interp.signature import forward_accepts

WEIGHTS_FILE = "router_weights.safetensors"
CONFIG_FILE = "router_config.json"
STATE_FILE = "checkpoint/state.pt"


@dataclass(frozen=True)
class RouterTuningConfig:
    """Router-tuning hyper-parameters; defaults follow the paper (Bai et al., 2025).

    Attributes:
        lr: peak learning rate (AdamW). epochs, batch_size: passes over the training set, examples per step.
        max_length: longest training sequence in tokens; longer prompts lose tokens from the left (the
            answer is always kept).
        warmup_ratio: linear warm-up over this fraction of all steps, then cosine decay to 0.
        weight_decay, max_grad_norm: AdamW weight decay; gradient-norm clip (``None``: no clipping).
        seed: order of examples per epoch and LoRA initialisation.
        lora_rank: 0 trains all router weights; ``r > 0`` trains a rank-``r`` delta ``(alpha / r) * B @ A``
            on each router weight matrix (``A`` [r, d] ~ N(0, 1/d), ``B`` [E, r] = 0; implemented here, no
            peft) and leaves router biases frozen.
        lora_alpha: LoRA scale numerator (default: ``2 * lora_rank``).
        eval_every: evaluate the dev loss every this many steps (``None``: after each epoch); the best
            evaluation's weights are kept.
        checkpoint_every: write the resume state every this many steps.
        template: prompt format (see :func:`moe_interp.prompts.format_example`).
        append_eos: train the end-of-sequence token after the answer too.
        eval_batch_size: batch size for the dev loss.
    """

    lr: float = 5e-4
    epochs: int = 3
    batch_size: int = 8
    max_length: int = 300
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    lora_rank: int = 0
    lora_alpha: float | None = None
    eval_every: int | None = None
    checkpoint_every: int = 50
    template: str = "paper"
    append_eos: bool = True
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "checkpoint_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"RouterTuningConfig.{name} must be an integer >= 1, got {value!r}")
        if not math.isfinite(self.lr) or self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or self.lora_rank < 0:
            raise InputError(
                f"RouterTuningConfig: need lr > 0, 0 <= warmup_ratio < 1, lora_rank >= 0 "
                f"(got {self.lr}, {self.warmup_ratio}, {self.lora_rank})"
            )
        if self.eval_every is not None and self.eval_every < 1:
            raise InputError(f"RouterTuningConfig.eval_every must be >= 1 or None, got {self.eval_every}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RouterTuningResult:
    """What :func:`tune_routers` produced.

    Attributes:
        weights: the best router weights, parameter name -> tensor (model dtype, CPU).
        history: one dict per dev evaluation (step, epoch, train_loss, dev_loss, lr); with a dev set the
            first entry (step 0) is the untuned routers' dev loss, for reference only.
        best_step, best_dev_loss: the evaluation whose weights were kept.
        path: the output folder (``None`` when run without ``out``).
    """

    weights: dict[str, torch.Tensor]
    config: RouterTuningConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    best_dev_loss: float = math.nan
    path: Path | None = None


# ------------------------------------------------------------------------------------------ parameters
def router_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of all parameters inside the MoE routers, in order."""
    arch = get_architecture(model)
    router_params = {id(p) for layer in arch.moe_layers(model) for p in layer.router.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in router_params]
    if not names:
        raise InputError(f"{arch.model_type}: the routers have no parameters to tune")
    return names


def _read_weights(source: Any) -> dict[str, torch.Tensor]:
    """Router weights from a :class:`RouterTuningResult`, a name -> tensor mapping, or a run folder / file."""
    if isinstance(source, RouterTuningResult):
        return dict(source.weights)
    if isinstance(source, Mapping):
        return dict(source)
    if source is None or not isinstance(source, (str, os.PathLike)):
        raise InputError(
            f"router weights must be a RouterTuningResult, a dict of tensors or a path, got "
            f"{type(source).__name__} (a run without out= has no path: pass result or result.weights)"
        )
    path = Path(source)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise InputError(f"no router weights at {path}")
    return load_file(str(path))


def _check_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    allowed = set(router_parameter_names(model))
    params = dict(model.named_parameters())
    for name, value in weights.items():
        if name not in allowed:
            what = "not a parameter of this model" if name not in params else "not a router parameter"
            raise InputError(f"router weight {name!r} is {what}; router parameters: {sorted(allowed)}")
        if tuple(value.shape) != tuple(params[name].shape):
            raise InputError(
                f"router weight {name!r} has shape {tuple(value.shape)}, the model's has "
                f"{tuple(params[name].shape)}"
            )
    return {name: params[name] for name in weights}


@torch.no_grad()
def load_router_weights(
    model: nn.Module, source: RouterTuningResult | str | os.PathLike[str] | Mapping[str, torch.Tensor]
) -> list[str]:
    """Copy saved router weights into ``model`` in place (permanently); returns the names set.

    ``source``: a tuning output folder, a ``.safetensors`` file or a name -> tensor dict. Every name must be
    a router parameter of ``model`` with the same shape.
    """
    weights = _read_weights(source)
    for name, param in _check_weights(model, weights).items():
        param.copy_(weights[name].to(device=param.device, dtype=param.dtype))
    return list(weights)


@contextmanager
def applied_router_weights(
    model: nn.Module, source: RouterTuningResult | str | os.PathLike[str] | Mapping[str, torch.Tensor]
) -> Iterator[nn.Module]:
    """Use the router weights from ``source`` inside the ``with`` block; the originals are restored bit for
    bit on exit (also on exceptions). Composes with :func:`~moe_interp.routerlens.mask_experts`."""
    weights = _read_weights(source)
    params = _check_weights(model, weights)
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        load_router_weights(model, weights)
        yield model
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


def _encode(tokenizer, examples, cfg: RouterTuningConfig, what: str) -> list[AnswerLossExample]:
    return encode_answer_loss(
        tokenizer,
        examples,
        template=cfg.template,
        max_length=cfg.max_length,
        append_eos=cfg.append_eos,
        what=what,
    )


# ------------------------------------------------------------------------------------------ the trainer
class _Trainer:
    """Router tensors outside the model, the loss, and evaluation."""

    def __init__(self, model: nn.Module, tokenizer, cfg: RouterTuningConfig):
        self.model, self.cfg = model, cfg
        self.names = router_parameter_names(model)
        self.params = dict(model.named_parameters())
        self.device = self.params[self.names[0]].device
        self.pad = pad_id(tokenizer)
        self.keep_arg = forward_accepts(model, "logits_to_keep")
        g = torch.Generator().manual_seed(cfg.seed)
        self.trainable: dict[str, torch.Tensor] = {}
        if cfg.lora_rank == 0:
            for n in self.names:
                self.trainable[n] = self.params[n].detach().float().clone().requires_grad_(True)
        else:
            self.lora_names = [n for n in self.names if self.params[n].dim() == 2]
            if not self.lora_names:
                raise InputError("LoRA: the routers have no weight matrix")
            r = cfg.lora_rank
            for n in self.lora_names:
                e, d = self.params[n].shape
                a = torch.randn(r, d, generator=g) / math.sqrt(d)
                self.trainable[f"{n}::lora_A"] = a.to(self.device).requires_grad_(True)
                self.trainable[f"{n}::lora_B"] = torch.zeros(e, r, device=self.device).requires_grad_(True)
            self.scale = (cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * r) / r

    def router_values(self) -> dict[str, torch.Tensor]:
        """The effective router weights (model dtype), differentiable w.r.t. the trainable tensors."""
        if self.cfg.lora_rank == 0:
            return {n: t.to(self.params[n].dtype) for n, t in self.trainable.items()}
        out = {}
        for n in self.lora_names:
            delta = self.trainable[f"{n}::lora_B"] @ self.trainable[f"{n}::lora_A"]
            out[n] = (self.params[n].float() + self.scale * delta).to(self.params[n].dtype)
        return out

    def loss_sums(self, batch: Sequence[AnswerLossExample]) -> tuple[torch.Tensor, int]:
        """Summed answer-token cross-entropy of ``batch`` (left-padded) and the number of answer tokens."""
        ids, mask = left_pad([e.head + e.tail for e in batch], self.pad)
        keep = max(len(e.tail) for e in batch) + 1
        kwargs: dict[str, Any] = dict(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
            use_cache=False,
        )
        if self.keep_arg:
            kwargs["logits_to_keep"] = keep
        out = torch.func.functional_call(
            self.model, self.router_values(), args=(), kwargs=kwargs, strict=False
        )
        logits = out.logits[:, -keep:-1].float()  # position j predicts token j + 1
        targets = torch.full(logits.shape[:2], -100, dtype=torch.long)
        for row, e in enumerate(batch):
            targets[row, keep - 1 - len(e.tail) :] = torch.tensor(e.tail)
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.to(logits.device).flatten(), reduction="sum"
        )
        return loss, sum(len(e.tail) for e in batch)

    @torch.no_grad()
    def dev_loss(self, dev: Sequence[AnswerLossExample]) -> float:
        total, n = 0.0, 0
        order = sorted(range(len(dev)), key=lambda i: len(dev[i].head) + len(dev[i].tail))
        bs = self.cfg.eval_batch_size
        for start in range(0, len(order), bs):
            loss, count = self.loss_sums([dev[i] for i in order[start : start + bs]])
            total, n = total + float(loss), n + count
        return total / max(n, 1)

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: v.detach().to("cpu").clone().contiguous() for n, v in self.router_values().items()}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


# ------------------------------------------------------------------------------------------ entry point
def tune_routers(
    model: nn.Module,
    tokenizer,
    train: Sequence[QAExample | Mapping[str, Any]],
    dev: Sequence[QAExample | Mapping[str, Any]] | None = None,
    *,
    config: RouterTuningConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    inplace: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> RouterTuningResult:
    """Router tuning: train only the routers of ``model`` on ``train`` (loss on answer tokens only).

    Args:
        train, dev: QAExamples (or dicts, see :func:`~moe_interp.routerlens.to_examples`); the target is
            ``answers[0]``. ``dev=None`` keeps the final weights instead of the best-dev-loss ones.
        config: hyper-parameters (paper defaults: :class:`RouterTuningConfig`).
        out: output folder (see module docstring). If it holds a finished run with the same configuration
            and data, that run is loaded instead of retrained; a partial run is resumed; another
            configuration is refused.
        inplace: also copy the best router weights into ``model`` (otherwise the model is untouched).
        callback: called as ``callback(step, logs)`` after every optimizer step (and checkpoint).

    Returns:
        :class:`RouterTuningResult`.
    """
    cfg = config or RouterTuningConfig()
    arch = get_architecture(model)
    train_ex, dev_ex = to_examples(train), to_examples(dev) if dev is not None else []
    if not train_ex:
        raise InputError("train is empty")
    train_enc = _encode(tokenizer, train_ex, cfg, "train")
    dev_enc = _encode(tokenizer, dev_ex, cfg, "dev")
    steps_per_epoch = math.ceil(len(train_enc) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    meta = {
        "config": cfg.to_dict(),
        "model_type": arch.model_type,
        "model": str(getattr(model.config, "_name_or_path", "") or ""),
        "train_fingerprint": fingerprint(train_enc),
        "dev_fingerprint": fingerprint(dev_enc),
        "n_train": len(train_enc),
        "n_dev": len(dev_enc),
        "steps": total,
        "parameters": router_parameter_names(model),
    }
    path = Path(out) if out is not None else None
    if path is not None:
        finished = _load_finished(path, meta)
        if finished is not None:
            if inplace:
                load_router_weights(model, finished.weights)
            return finished
        path.mkdir(parents=True, exist_ok=True)
        check_run_settings(path / "run.json", meta, "router-tuning")

    trainer = _Trainer(model, tokenizer, cfg)
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(list(trainer.trainable.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)
    step, history, best, best_loss, best_step = 0, [], None, math.inf, 0
    running: list[float] = []  # train losses since the last evaluation
    state_path = path / STATE_FILE if path is not None else None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        with torch.no_grad():
            for n, t in trainer.trainable.items():
                t.copy_(state["trainable"][n])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, history = int(state["step"]), list(state["history"])
        best, best_loss, best_step = state["best"] or None, float(state["best_loss"]), int(state["best_step"])
        running = list(state["running"])

    def save_state() -> None:
        if state_path is None:
            return
        _atomic_torch_save(
            {
                "step": step,
                "trainable": {n: t.detach().cpu() for n, t in trainer.trainable.items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "history": history,
                "best": best or {},
                "best_loss": best_loss,
                "best_step": best_step,
                "running": running,
            },
            state_path,
        )

    if step == 0 and not history and dev_enc:  # reference: the untuned routers (not a candidate)
        with ModelPatch() as patch:
            patch.eval_mode(model)
            history.append({"step": 0, "epoch": 0.0, "dev_loss": trainer.dev_loss(dev_enc)})
    grads_were = {n: p.requires_grad for n, p in model.named_parameters()}
    bar = tqdm(total=total, initial=step, desc="router tuning", unit="step", disable=not progress)
    try:
        with ModelPatch() as patch:
            patch.eval_mode(model)
            for p in model.parameters():
                p.requires_grad_(False)
            while step < total:
                epoch, index = divmod(step, steps_per_epoch)
                order = _epoch_order(len(train_enc), cfg.seed, epoch)
                batch = [train_enc[i] for i in order[index * cfg.batch_size : (index + 1) * cfg.batch_size]]
                loss_sum, count = trainer.loss_sums(batch)
                loss = loss_sum / count
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(list(trainer.trainable.values()), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                running.append(loss.item())
                logs: dict[str, Any] = {"step": step, "epoch": epoch, "loss": running[-1]}
                end_of_epoch = step % steps_per_epoch == 0
                due = step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
                if due or step == total:
                    record = {
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "train_loss": sum(running) / len(running),
                        "lr": scheduler.get_last_lr()[0],
                    }
                    running.clear()
                    if dev_enc:
                        record["dev_loss"] = trainer.dev_loss(dev_enc)
                        if record["dev_loss"] < best_loss:
                            best, best_loss, best_step = trainer.snapshot(), record["dev_loss"], step
                    else:
                        best, best_step = trainer.snapshot(), step
                    history.append(record)
                    logs.update(record)
                    bar.set_postfix(dev=f"{record.get('dev_loss', math.nan):.4f}")
                if due or step == total or step % cfg.checkpoint_every == 0:
                    save_state()
                bar.update(1)
                if callback is not None:
                    callback(step, logs)
    finally:
        bar.close()
        for n, p in model.named_parameters():
            p.requires_grad_(grads_were[n])

    assert best is not None
    result = RouterTuningResult(
        weights=best,
        config=cfg,
        history=history,
        best_step=best_step,
        best_dev_loss=best_loss if dev_enc else math.nan,
        path=path,
    )
    if path is not None:
        _atomic_save_file(best, path / WEIGHTS_FILE)
        write_json_atomic(
            path / CONFIG_FILE,
            {**meta, "best_step": best_step, "best_dev_loss": result.best_dev_loss, "history": history},
        )
        (path / STATE_FILE).unlink(missing_ok=True)  # finished: the resume state is no longer needed
        if (path / STATE_FILE).parent.is_dir() and not any((path / STATE_FILE).parent.iterdir()):
            (path / STATE_FILE).parent.rmdir()
    if inplace:
        load_router_weights(model, best)
    return result


def _load_finished(path: Path, meta: dict[str, Any]) -> RouterTuningResult | None:
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        return None
    check_run_settings(path / "run.json", meta, "router-tuning")
    return load_tuning_result(path)


def load_tuning_result(path: str | os.PathLike[str]) -> RouterTuningResult:
    """Read a finished tuning folder (weights + config) without the model or data."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise InputError(f"{path} holds no finished router-tuning run ({CONFIG_FILE} missing)")
    saved = json.loads((path / CONFIG_FILE).read_text())
    loss = saved.get("best_dev_loss")
    return RouterTuningResult(
        weights=load_file(str(path / WEIGHTS_FILE)),
        config=RouterTuningConfig(**saved["config"]),
        history=saved.get("history", []),
        best_step=int(saved.get("best_step", 0)),
        best_dev_loss=math.nan if loss is None else float(loss),
        path=path,
    )
