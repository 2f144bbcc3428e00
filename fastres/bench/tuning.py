"""auto's choices as a table: which implementation won each signature, and by how much."""
from __future__ import annotations

from typing import List


def _short(signature: str, width: int = 70) -> str:
    return signature if len(signature) <= width else signature[:width - 3] + "..."


def tuning_table(entries: List[dict]) -> List[str]:
    """One row per signature: op, signature, choice[config], source, each timed candidate's ms
    (fastest first) and the winner's margin over the runner-up."""
    if not entries:
        return ["auto made no choices (every call had a single candidate, or another backend ran)"]
    lines = ["| op | signature | choice | source | candidates (median ms) | margin |", "|---|---|---|---|---|---|"]
    for e in entries:
        timed = sorted((v, k) for k, v in e["candidates"].items() if isinstance(v, (int, float)))
        others = [f"{k}: {v}" for k, v in e["candidates"].items() if not isinstance(v, (int, float))]
        cells = ", ".join(f"{k} {v:.3f}" for v, k in timed) or "-"
        if others and e["source"] == "measured":
            cells += "; " + "; ".join(others)
        margin = f"{timed[1][0] / timed[0][0]:.2f}x" if len(timed) > 1 and timed[0][0] > 0 else "-"
        choice = e["choice"] + (f"[{e['config']}]" if e.get("config") else "")
        lines.append(f"| {e['op']} | {_short(e['signature'])} | {choice} | {e['source']} | {cells} | {margin} |")
    return lines
