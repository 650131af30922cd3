"""Results: every figure as a JSON line (results.jsonl, written as it is measured), and the failures.

A record is {"run", "metric", "server", "value", "unit", ...extra}; `value` is None for a figure
that was skipped (with `skipped=why`) or failed verification (`verified=False`, `error`). The
table and the chart are drawn from these records only.
"""

from __future__ import annotations

import json
from pathlib import Path


class Results:
    def __init__(self, out: Path, run_id: str) -> None:
        self.records: list[dict[str, object]] = []
        self.out = out
        self.run_id = run_id
        self.failures: list[str] = []

    def add(self, metric: str, server: str, value: float | None, unit: str, **extra: object) -> None:
        rec = {"run": self.run_id, "metric": metric, "server": server, "value": value, "unit": unit}
        rec.update(extra)
        self.records.append(rec)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def fail(self, what: str, error: Exception) -> None:
        self.failures.append(f"{what}: {error}")
        print(f"!! VERIFY FAILED {what}: {error}", flush=True)
        self.add(what, "-", None, "", verified=False, error=str(error))


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def spread(values: list[float]) -> dict[str, float]:
    """The extra fields of a median over rounds: the table derives its ± (noise) column from them."""
    return {"min": min(values), "max": max(values), "n": len(values)}
