"""Safe loading of a local model folder: safetensors only, remote code only when asked, clear errors.

>>> model, tok = load_model("path/to/olmoe")        # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moe_interp.errors import DataError, InputError, MoEInterpError

WEIGHT_SUFFIX = ".safetensors"


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    tokenizer: bool = True,
    require_moe: bool = False,
):
    """Load a causal LM (and its tokenizer) from a local folder with ``from_pretrained``.

    Only safetensors weights are read (a folder holding only pickled ``.bin`` / ``.pt`` weights is refused),
    nothing is downloaded, and the model's own Python code runs only with ``trust_remote_code=True``. With
    ``require_moe=True`` the config's ``model_type`` is checked against the registered MoE architectures
    before any weight is read.

    Returns:
        ``(model, tokenizer)`` in eval mode (``tokenizer`` is None when ``tokenizer=False``).

    Raises:
        DataError: naming the file that is missing, truncated or malformed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"model folder {folder} does not exist")
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise DataError(f"{folder / 'config.json'} has no 'model_type': not a transformers config")
    if require_moe:
        from types import SimpleNamespace

        from moe_interp.architectures import get_architecture

        get_architecture(SimpleNamespace(model_type=config["model_type"]))
    if config.get("auto_map") and not trust_remote_code:
        raise InputError(
            f"{folder / 'config.json'} asks for the model's own code (auto_map); pass trust_remote_code=True "
            "(or --trust-remote-code) only if you trust that code"
        )
    _check_weights(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise DataError(f"could not load the model in {folder}: {exc}") from exc
    model.eval()
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(
                folder, trust_remote_code=trust_remote_code, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, Exception) as exc:  # noqa: BLE001
            names = [p.name for p in folder.glob("tokenizer*")] or ["no tokenizer files"]
            raise DataError(f"could not load the tokenizer in {folder} ({', '.join(names)}): {exc}") from exc
        check_tokenizer(model, tok)
    return model, tok


def check_tokenizer(model, tokenizer) -> None:
    """Raise if the tokenizer can produce ids the model has no embedding for."""
    rows = model.get_input_embeddings().weight.shape[0]
    size = len(tokenizer)
    if size > rows:
        raise InputError(
            f"tokenizer has {size} tokens but the model's embedding has {rows} rows: "
            "they do not belong together"
        )


def _read_json(file: Path):
    if not file.is_file():
        raise DataError(f"{file} is missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{file} is not valid JSON ({exc})") from exc


def _check_weights(folder: Path) -> None:
    from safetensors import safe_open

    files = sorted(folder.glob(f"*{WEIGHT_SUFFIX}"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        hint = (
            f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them)"
            if pickled
            else ""
        )
        raise DataError(f"{folder} holds no {WEIGHT_SUFFIX} weights{hint}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name).get_shape()
            _check_size(file)
        except MoEInterpError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise DataError(f"{file} is not a readable safetensors file ({exc})") from exc


def _check_size(file: Path) -> None:
    """Detect truncation: the header's last tensor must end inside the file."""
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    need = 8 + header_len + (max(ends) if ends else 0)
    if file.stat().st_size < need:
        raise DataError(f"{file} is truncated: {file.stat().st_size} bytes, its header describes {need}")
