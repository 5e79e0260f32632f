"""The one record type every loader produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QAExample:
    """A (possibly context-grounded) question with its gold answers.

    Attributes:
        id: Identifier, unique within a loaded data set (the official id where one exists,
            else ``"<dataset>/<split>/<index>"``).
        context: The passage the question is asked against; ``None`` for closed-book examples.
        question: The question (for CounterFact: the cloze prompt).
        answers: Gold answers, i.e. the answers the *context* supports (for closed-book examples:
            the true answer). Empty only for unanswerable questions (SQuAD v2, opt-in).
        memorised_answer: The original / parametric answer where known (CounterFact
            ``ground_truth``); ``None`` if unknown.
        counterfactual_answer: The substituted answer the context asserts where the context is
            counterfactual (NQ-Swap, ConFiQA, CounterFact ``target_new``); ``None`` otherwise.
        source: ``"<dataset>:<file path relative to the data root>"`` (or the file path).
    """

    id: str
    context: str | None
    question: str
    answers: tuple[str, ...]
    memorised_answer: str | None = None
    counterfactual_answer: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.answers, tuple):
            # Frozen dataclass: normalise lists to tuples so instances stay hashable.
            object.__setattr__(self, "answers", tuple(self.answers))

    @property
    def has_context(self) -> bool:
        """Whether the example comes with a context (open-book)."""
        return self.context is not None
