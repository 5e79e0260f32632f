"""Routing rules as data: how each architecture turns router logits into chosen experts and weights.

:meth:`RoutingRule.route` reproduces a model's own router exactly (tests compare it with every registered
architecture's router output), and takes a ``blocked`` mask so that interventions can make experts
unselectable under the model's own rule.

The rule, in order:

1. ``score``: scores over all experts (``softmax`` or ``sigmoid`` of the logits, or the ``logits``).
2. ``choice_bias``: a router buffer added to the scores for choosing only (DeepSeek-V3).
3. ``group_score``: group-limited choice; groups are ranked by their best (``max``) or best-two
   (``top2_sum``) score and only the top ``topk_group`` groups stay eligible.
4. top-k over the eligible (and not blocked) experts.
5. ``weights``: the chosen ``score`` values, or a softmax / sigmoid over the chosen logits.
6. ``renormalize``: divide by the p-norm of the chosen weights (p=1: sum) when enabled.
7. ``scaling``: multiply by a config factor (DeepSeek's ``routed_scaling_factor``).

A ``custom`` callable replaces steps 1-7 for rules that are not of this shape (PhiMoE's sparsemixer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

NEG_INF = float("-inf")


@dataclass(frozen=True)
class RoutingRule:
    """Declarative description of one router's selection rule (see the module docstring).

    Config-valued fields name a config attribute (dotted paths allowed, e.g.
    ``"ffn_config.moe_normalize_expert_weights"``) so that one description serves every model size.
    """

    score: Literal["softmax", "sigmoid", "logits"] = "softmax"
    choice_bias: str | None = None
    group_score: Literal["max", "top2_sum"] | None = None
    group_when: tuple[str, object] | None = None
    weights: Literal["score", "softmax_topk", "sigmoid_topk"] = "score"
    renormalize: bool | str = False
    renormalize_p: str | float = 1.0
    renormalize_eps: float = 0.0
    scaling: str | None = None
    custom: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, E] float32 scores over all experts (step 1)."""
        logits = logits.float()
        if self.score == "softmax":
            return torch.softmax(logits, dim=-1)
        if self.score == "sigmoid":
            return torch.sigmoid(logits)
        return logits

    def choice_scores(self, logits: torch.Tensor, router: nn.Module | None) -> torch.Tensor:
        """[T, E] scores used to choose experts (steps 1-2), before group limits."""
        scores = self.scores(logits)
        if self.choice_bias is not None and router is not None:
            scores = scores + getattr(router, self.choice_bias).float()
        return scores

    def route(
        self,
        logits: torch.Tensor,
        config,
        top_k: int,
        router: nn.Module | None = None,
        blocked: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts chosen and weights applied.

        Args:
            logits: [T, E] router logits.
            blocked: [E] or [T, E] bool; blocked experts are never chosen.

        Returns:
            weights [T, k] float32 and indices [T, k] int64.
        """
        if self.custom is not None:
            masked = logits if blocked is None else logits.masked_fill(blocked, NEG_INF)
            weights, indices = self.custom(masked, router=router, config=config, top_k=top_k)
            return weights.float(), indices.long()
        scores = self.scores(logits)
        choice = self.choice_scores(logits, router)
        if blocked is not None:
            choice = choice.masked_fill(blocked.to(choice.device), NEG_INF)
        groups = self.group_limit(config)
        if groups is not None:
            choice = groups.apply(choice)[0]
        indices = torch.topk(choice, top_k, dim=-1).indices
        if self.weights == "score":
            weights = scores.gather(-1, indices)
        else:
            chosen = logits.float().gather(-1, indices)
            weights = (
                torch.softmax(chosen, dim=-1) if self.weights == "softmax_topk" else torch.sigmoid(chosen)
            )
        if self._flag(config, self.renormalize):
            p = (
                self.renormalize_p
                if isinstance(self.renormalize_p, float)
                else config_value(config, self.renormalize_p)
            )
            weights = weights / (
                torch.linalg.vector_norm(weights, ord=p, dim=-1, keepdim=True) + self.renormalize_eps
            )
        if self.scaling is not None:
            weights = weights * float(config_value(config, self.scaling))
        return weights, indices

    def _grouping_on(self, config) -> bool:
        if self.group_when is None:
            return True
        key, value = self.group_when
        return config_value(config, key) == value

    def group_limit(self, config) -> GroupLimit | None:
        """The group limit this rule applies under ``config``, or None (no group-limited choice)."""
        if self.group_score is None or not self._grouping_on(config):
            return None
        return GroupLimit(
            int(config_value(config, "n_group")), int(config_value(config, "topk_group")), self.group_score
        )

    @staticmethod
    def _flag(config, value: bool | str) -> bool:
        if isinstance(value, bool):
            return value
        return bool(config_value(config, value))


def config_value(config, path: str):
    """Read a (dotted) config attribute; dict-valued sub-configs are indexed by key."""
    obj = config
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


@dataclass(frozen=True)
class GroupLimit:
    """Group-limited choice: experts in ``n_group`` equal groups, ranked by their best (``"max"``) or
    best-two (``"top2_sum"``) score; only the top ``topk_group`` groups stay eligible."""

    n_group: int
    topk_group: int
    score: Literal["max", "top2_sum"]

    def apply(self, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``choice`` [..., E] with ineligible groups' experts at -inf, and the group scores [..., G]."""
        grouped = choice.reshape(*choice.shape[:-1], self.n_group, -1)
        finite = grouped.masked_fill(torch.isinf(grouped), torch.finfo(grouped.dtype).min)
        if self.score == "max":
            group_scores = finite.max(dim=-1).values
        else:
            group_scores = finite.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(group_scores, self.topk_group, dim=-1).indices, True)
        return grouped.masked_fill(~keep[..., None], NEG_INF).reshape(choice.shape), group_scores


def near_ties(
    choice_scores: torch.Tensor, top_k: int, tol: float, groups: GroupLimit | None = None
) -> torch.Tensor:
    """[...] bool: the choice could flip in low precision (bf16): the k-th and (k+1)-th choice scores
    differ by at most ``tol``; under a group limit, among the eligible experts, or the ``topk_group``-th
    and next group scores do.

    ``choice_scores``: [..., E].
    """
    scores = choice_scores.float()
    flags = torch.zeros(scores.shape[:-1], dtype=torch.bool)
    if groups is not None:
        scores, group_scores = groups.apply(scores)
        if groups.n_group > groups.topk_group:
            top = torch.topk(group_scores, groups.topk_group + 1, dim=-1).values
            flags |= top[..., groups.topk_group - 1] - top[..., groups.topk_group] <= tol
    if scores.shape[-1] > top_k:
        top = torch.topk(scores, top_k + 1, dim=-1).values
        flags |= top[..., top_k - 1] - top[..., top_k] <= tol  # -inf - -inf is nan: not flagged
    return flags
