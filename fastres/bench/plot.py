"""Throughput against batch size, one line per variant and mode (matplotlib, optional: the
`bench` extra installs it; without it --plot fails with a clear message, nothing else does)."""
from __future__ import annotations

from typing import Dict, List


def require_matplotlib():
    """matplotlib.pyplot on a file-only backend, or a RuntimeError saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError(f"--plot needs matplotlib ({error}): pip install 'fastres[bench]' or "
                           f"pip install matplotlib") from None
    return plt


def plot_throughput(rows: List[dict], path: str, title: str) -> None:
    plt = require_matplotlib()
    lines: Dict[str, List[tuple]] = {}
    for row in rows:
        lines.setdefault(f"{row['variant']} ({row['mode']})", []).append((row["batch"], row["img_per_s"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (median)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
