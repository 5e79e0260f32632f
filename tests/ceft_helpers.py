"""Shared helpers of the CEFT tests: a small synthetic QA set for the tiny random models."""

from __future__ import annotations


def qa_records(n: int = 16) -> list[dict]:
    return [
        {
            "id": str(i),
            "context": f"The Eiffel Tower is in Paris{i % 5}. café {i}",
            "question": "Where is the Eiffel Tower?" + " x" * (i % 4),
            "context_answer": f"Paris{i % 5}",
        }
        for i in range(n)
    ]
