"""Prompt formats for context-faithfulness experiments.

The context template is the user turn of Bai et al. (EMNLP 2025, Router Lens / CEFT). Models without a
chat template (such as the embedded demo model) get a plain answer cue appended; the answer follows the
cue after a single space, e.g. ``build_prompt(ctx, q) + " Paris"``.

Closed-book prompts (no context) keep the same question/answer framing without the instruction::

    Question:
    {question}

    Answer:
"""

from __future__ import annotations

#: The paper's user turn (Router Lens / CEFT code), with ``{context}`` and ``{question}`` slots.
CONTEXT_TEMPLATE = (
    "Based on the context below, output the correct answer for the following question."
    "\n\nContext:\n{context}\n\nQuestion:\n{question}"
)
#: Closed-book variant of the user turn: the question part of :data:`CONTEXT_TEMPLATE` only.
CLOSED_BOOK_TEMPLATE = "Question:\n{question}"
#: Plain answer cue appended for models without a chat template; the answer follows after one space.
ANSWER_CUE = "\n\nAnswer:"


def build_prompt(context: str | None, question: str) -> str:
    """Return the full prompt for ``question``, with ``context`` if given, ending in :data:`ANSWER_CUE`.

    ``context=None`` gives the closed-book format. An empty string is treated as a (blank) context.
    """
    if context is None:
        body = CLOSED_BOOK_TEMPLATE.format(question=question)
    else:
        body = CONTEXT_TEMPLATE.format(context=context, question=question)
    return body + ANSWER_CUE


__all__ = ["ANSWER_CUE", "CLOSED_BOOK_TEMPLATE", "CONTEXT_TEMPLATE", "build_prompt"]
