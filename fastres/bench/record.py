"""A run as records: the JSON (environment + every figure) and a short markdown table, written
side by side into a results folder (benchmarks/results/) without overwriting earlier runs."""
from __future__ import annotations

import json
import os
import re
import time
from typing import List, Tuple

from .memory import CPU_NOTE
from .metrics import cell

COLUMNS = ("variant", "mode", "batch", "ms/batch (median +/- sd)", "img/s", "TFLOP/s", "% peak", "peak MiB",
           "vs tv NCHW fp32", "vs tv channels_last, same dtype")
NOISY = 0.2  # a spread above this fraction of the median is flagged


def table(rows: List[dict]) -> List[str]:
    """A markdown table of the result rows (the terminal prints the same lines)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], r["mode"], str(r["batch"]), f"{r['ms_median']:.2f} +/- {r['ms_spread']:.2f}"
            + (" (noisy)" if r["ms_spread"] > NOISY * r["ms_median"] else ""),
            f"{r['img_per_s']:.1f}", cell(r["tflops"], 3), cell(r["pct_of_peak"], 1),
            cell(r["peak_memory_mib"], 0), cell(r.get("vs_torchvision_nchw"), 2, "x"),
            cell(r.get("vs_torchvision_channels_last"), 2, "x")]) + " |")
    return lines + notes(rows)


def notes(rows: List[dict]) -> List[str]:
    """What a reader of the table needs to know to read it right."""
    out = []
    if any(r["ms_spread"] > NOISY * r["ms_median"] for r in rows):
        out.append(f"(noisy): spread above {NOISY:.0%} of the median; compare such rows only across repeated runs.")
    if any((r.get("pct_of_peak") or 0) > 100 for r in rows):
        out.append("% peak counts direct-convolution FLOPs over the measured matmul peak: Winograd does fewer "
                   "multiplies, so it can pass 100%.")
    if any(r.get("peak_memory_mib") is None for r in rows):
        out.append("peak MiB: measured on CUDA only (torch.cuda.max_memory_allocated); n/a on the CPU.")
    return out


def markdown(record: dict) -> str:
    env = record["environment"]
    verify = record.get("verify") or []
    verdict = ("not run (--skip-verify)" if not verify else
               "passed" if all(v["ok"] for v in verify) else "FAILED")
    memory = "torch.cuda.max_memory_allocated over one call" if env["device_type"] == "cuda" else CPU_NOTE
    lines = [
        f"# {env['device_type'].upper()} record: {record['model']} {', '.join(record['modes'])}, {record['dtype']}, "
        f"batch {', '.join(str(b) for b in record['batches'])}, {record['size']}x{record['size']}",
        "",
        f"Device: {env['device']}" + (f" (driver {env.get('driver')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')})"
                                      if env["device_type"] == "cuda" else
                                      f" ({env.get('cpu_capability', 'unknown')}), {env['cpu_threads']} threads"),
        f"Versions: torch {env['torch']}, torchvision {env['torchvision']}, triton {env['triton']}, "
        f"fastres {env['fastres']} at commit {env['fastres_commit']}, default backend `{env['backend']}`.",
        f"Command: `{record['command']}`",
        f"Numerics against torchvision: {verdict}.",
        "Measured peak (matmul): " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in record["peak_tflops"].items()) +
        f"; peak memory: {memory}.",
        f"Timing: {record['warmup']} warm-up and {record['rounds']} timed calls per variant, median and standard "
        f"deviation; TFLOP/s counts conv + fc FLOPs (training step = 3x forward).",
        "",
    ] + table(record["results"])
    for skipped in record.get("skipped", []):
        lines.append(f"\nSkipped {skipped['variant']} ({skipped['mode']}, batch {skipped['batch']}): {skipped['why']}")
    for line in record.get("seed_report", {}).get("lines", []):
        lines.append(f"\n    {line}")
    return "\n".join(lines) + "\n"


def write_record(record: dict, folder: str) -> Tuple[str, str]:
    """Write <device>-<model>-<dtype>-<UTC time>.json and .md into `folder`; returns both paths."""
    os.makedirs(folder, exist_ok=True)
    env = record["environment"]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{env['device_type']}-{record['model']}-{record['dtype']}".lower()).strip("-")
    stem = os.path.join(folder, f"{slug}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    suffix = 0
    while os.path.exists(f"{stem}{'-' + str(suffix) if suffix else ''}.json"):  # never overwrite a record
        suffix += 1
    stem = f"{stem}{'-' + str(suffix) if suffix else ''}"
    with open(f"{stem}.json", "w") as handle:
        json.dump(record, handle, indent=2)
    with open(f"{stem}.md", "w") as handle:
        handle.write(markdown(record))
    return f"{stem}.json", f"{stem}.md"
