"""pytest-benchmark suites: fused ops, blocks and whole models against torchvision / PyTorch
eager and torch.compile, on every fastres backend (see README.md here).

What runs is read from FASTRES_BENCH_* (fastres.bench.config): full sizes on a GPU, a quick
mode with small images on a CPU. Every case is parametrised by `impl`, `dtype`, `layout` and
`batch`; cases of one shape and batch share a pytest-benchmark group, so the baselines and
fastres sit in one table. After the run a summary adds img/s, TFLOP/s, % of the device's
measured matmul peak and peak memory. `--benchmark-disable` runs each case once (CI smoke test).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import pytest
import torch

from fastres.bench.config import current_settings
from fastres.bench.memory import CPU_NOTE, peak_memory_bytes
from fastres.bench.metrics import cell, figures
from fastres.bench.roofline import measured_peak_flops
from fastres.bench.timing import synchronize
from fastres.bench.variants import CompileUnavailable, Variant, first_call

_ROWS: List[Dict] = []


def pytest_report_header(config):
    s = current_settings()
    return (f"fastres benchmarks: {'quick' if s.quick else 'full'} mode on {s.device}, {s.size}x{s.size} images, "
            f"batches {list(s.batches)}, dtype-layouts {['-'.join(p) for p in s.points]}, warm-up {s.warmup}, "
            f"rounds {s.rounds}, torch.compile: {s.compile}{' (+max-autotune)' if s.max_autotune else ''}")


def pytest_generate_tests(metafunc):
    s = current_settings()
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype,layout", s.points, ids=[f"{d}-{l}" for d, l in s.points])
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", s.batches, ids=[f"batch={b}" for b in s.batches])
    if "impl" in metafunc.fixturenames:
        # each suite module names its eager baseline: "pytorch" (unfused ops) or "torchvision"
        metafunc.parametrize("impl", current_settings().implementations(metafunc.module.BASELINE))


@pytest.fixture(scope="session")
def settings():
    return current_settings()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def variant(settings, impl, dtype, layout) -> Variant:
    return Variant(impl, dtype, layout)


@pytest.fixture
def measure(benchmark, settings):
    """measure(step, variant, group=..., images=..., flops=..., smallest=...): skip the case if the
    settings say so, run it once (compiles), then time it with pytest-benchmark and record figures."""
    def run(step: Callable[[], object], variant: Variant, *, group: str, images: int,
            flops: Optional[float] = None, smallest: bool = False) -> None:
        reason = settings.skip_reason(variant.impl, smallest)
        if reason:
            pytest.skip(reason)
        try:
            if benchmark.disabled:  # smoke test: the fixture runs the case once
                benchmark.pedantic(first_call, args=(step, variant))
                return
            first_s = first_call(step, variant)
        except CompileUnavailable as error:
            pytest.skip(str(error))
        device = settings.device

        def timed():
            step()
            synchronize(device)  # the call's kernels are inside the measured time

        benchmark.group = group
        benchmark.pedantic(timed, rounds=settings.rounds, warmup_rounds=settings.warmup, iterations=1)
        stats = benchmark.stats.stats
        peak = measured_peak_flops(device, variant.torch_dtype) if flops else None
        row = figures(median_s=stats.median, spread_s=stats.stddev, images=images, flops=flops, peak_flops=peak,
                      peak_memory=peak_memory_bytes(step, device))
        row.update(variant=variant.name, impl=variant.impl, dtype=variant.dtype, layout=variant.layout,
                   first_call_s=first_s, peak_tflops=peak / 1e12 if peak else None)
        benchmark.extra_info.update(row)
        _ROWS.append(dict(row, group=group))
    return run


def _baseline(rows: List[Dict], impl: str, layout: str, dtype: str) -> Optional[Dict]:
    return next((r for r in rows if r["impl"] == impl and r["layout"] == layout and r["dtype"] == dtype), None)


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    s = current_settings()
    amp = s.amp_dtype
    write = terminalreporter.write_line
    terminalreporter.section("fastres figures (median of each case; % peak = of this device's measured matmul peak)")
    if s.device.type != "cuda":
        write(f"peak memory: {CPU_NOTE}")
    groups: Dict[str, List[Dict]] = {}
    for row in _ROWS:
        groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        eager = next((r["impl"] for r in rows if r["impl"] in ("torchvision", "pytorch")), "torchvision")
        nchw, cl_amp = _baseline(rows, eager, "nchw", "fp32"), _baseline(rows, eager, "channels_last", amp)
        write("")
        write(f"{group}  (speedups vs {eager} eager NCHW fp32 and channels_last {amp})")
        write(f"  {'variant':40s} {'ms':>9s} {'+/-':>7s} {'img/s':>9s} {'TFLOP/s':>8s} {'%peak':>6s} "
              f"{'mem MiB':>8s} {'vs NCHW':>8s} {'vs CL':>6s}")
        for r in rows:
            vs = [cell(b["ms_median"] / r["ms_median"], 2, "x") if b else "n/a" for b in (nchw, cl_amp)]
            write(f"  {r['variant']:40s} {r['ms_median']:9.2f} {r['ms_spread']:7.2f} {r['img_per_s']:9.1f} "
                  f"{cell(r['tflops'], 3):>8s} {cell(r['pct_of_peak'], 1):>6s} {cell(r['peak_memory_mib'], 0):>8s} "
                  f"{vs[0]:>8s} {vs[1]:>6s}")
