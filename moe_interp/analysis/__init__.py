"""Attention amplification, logit lens and per-expert faithfulness attribution (Bai et al., EMNLP 2025).

>>> att_b = span_attention(model, tok, examples)                               # doctest: +SKIP
>>> with mask_experts(model, ce): att_t = span_attention(model, tok, examples)  # doctest: +SKIP
>>> attention_gains(att_b, att_t)            # CAG / AAG per layer               # doctest: +SKIP
>>> answer_probability_gain(answer_lens(base, tok, ex), answer_lens(tuned, tok, ex))  # APG  # doctest: +SKIP
>>> rank_agreement(masking_effects(model, tok, ex), gradient_effects(model, tok, ex))  # doctest: +SKIP
"""

from moe_interp.analysis.amplification import amplification_by_experts, ce_oe_sets
from moe_interp.analysis.attribution import (
    ExpertEffects,
    gradient_effects,
    masking_effects,
    rank_agreement,
    spearman,
)
from moe_interp.analysis.figures import apg_figure, expert_heatmap, gains_figure, token_difference_figure
from moe_interp.analysis.gains import (
    answer_probability_gain,
    answer_probability_gain_per_example,
    attention_gains,
    attention_gains_per_example,
)
from moe_interp.analysis.lens import LensResult, answer_lens, decode_residual, final_norm
from moe_interp.analysis.rows import RowAttentionRecorder
from moe_interp.analysis.spans import SpanAttention, span_attention
from moe_interp.analysis.tokens import TokenAttention, token_attention, token_attention_difference

__all__ = [
    "ExpertEffects",
    "LensResult",
    "RowAttentionRecorder",
    "SpanAttention",
    "TokenAttention",
    "amplification_by_experts",
    "answer_lens",
    "answer_probability_gain",
    "answer_probability_gain_per_example",
    "apg_figure",
    "attention_gains",
    "attention_gains_per_example",
    "ce_oe_sets",
    "decode_residual",
    "expert_heatmap",
    "final_norm",
    "gains_figure",
    "gradient_effects",
    "masking_effects",
    "rank_agreement",
    "spearman",
    "span_attention",
    "token_attention",
    "token_attention_difference",
    "token_difference_figure",
]
