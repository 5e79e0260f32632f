"""Embedded demo model: a small MoE causal LM trained from scratch on CounterFact facts.

``load_demo()`` returns the shipped model (float32, eval mode) and its tokenizer, offline, from
``moe_interp/demo/weights/``. ``load_split(name)`` reads the committed data splits (see
:mod:`moe_interp.demo.splits`). The recipe and measured numbers are in ``weights/MODEL_CARD.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moe_interp.demo.splits import SPLIT_NAMES, load_split

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def load_demo() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load the demo model (float32, eval mode) and tokenizer from the package folder, offline."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if not (WEIGHTS_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"demo weights missing in {WEIGHTS_DIR}; train them with python -m moe_interp.demo.train"
        )
    model = AutoModelForCausalLM.from_pretrained(WEIGHTS_DIR, dtype=torch.float32, local_files_only=True)
    model.eval()
    tok = PreTrainedTokenizerFast.from_pretrained(WEIGHTS_DIR, local_files_only=True)
    return model, tok


__all__ = ["SPLIT_NAMES", "WEIGHTS_DIR", "load_demo", "load_split"]
