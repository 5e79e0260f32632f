"""Attention probabilities for chosen query rows only, without changing the model's attention kernel.

A thin front for :class:`moe_interp.attention.AttentionRecorder` with ``rows``: the wrapper gathers the
requested query rows *before* computing probabilities, so cost and memory are ``[B, H, R, T]`` per layer
instead of ``[B, H, T, T]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_interp.attention import AttentionRecorder, select_rows

__all__ = ["RowAttentionRecorder", "select_rows"]


class RowAttentionRecorder(AttentionRecorder):
    """Reports attention probabilities of selected query rows for every attention layer.

    Args:
        rows: [B, R] long query positions per batch row (pad with any valid position and ignore those).
        on_rows: called as ``on_rows(layer_number, probs)`` with probs [B, H, R, K] float32, where K is the
            key length (padding keys get probability 0).
    """

    def __init__(self, rows: torch.Tensor, on_rows: Callable[[int, torch.Tensor], None]) -> None:
        super().__init__(on_rows, rows=rows)
