"""Print the README's benchmark table, memory line and trace-vs-peer verdicts from a results JSON.

python benchmarks/readme_table.py benchmarks/results/trace_overhead.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def render(results: dict) -> str:
    rows = results["rows"]
    cells = list(dict.fromkeys((r["model"], r["shape"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["model"], r["shape"], r["variant"]): r for r in rows}
    lines = [
        "| variant | " + " | ".join(f"{m} {s}" for m, s in cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for v in variants:
        out = []
        for m, s in cells:
            r = by.get((m, s, v))
            if r is None:
                out.append("-")
                continue
            text = f"{r['ratio']:.2f}x / {r['ratio_last_token_logits']:.2f}x"
            if v == "plain forward":
                text += f" ({r['ms']:.0f} ms)"
            out.append(text)
        lines.append(f"| {v} | " + " | ".join(out) + " |")
    memory = ", ".join(f"{r['model']} {r['shape']} {r['ratio']:.2f}x" for r in results.get("memory", []))
    lines += ["", f"Memory held vs needed: {memory}.", "", "Pairs (median per-repetition ratio, 95% CI):"]
    for c in results.get("comparisons", []):
        lo, hi = c["ci95"]
        lines.append(
            f"- {c['model']} {c['shape']}: {c['trace']} / {c['peer']}: {c['ratio']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"{c['verdict']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(
        render(
            json.loads(
                Path(
                    sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/trace_overhead.json"
                ).read_text()
            )
        )
    )
