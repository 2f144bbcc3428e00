"""`python -m fastres.bench`: check fastres against torchvision, then time them side by side.

    python -m fastres.bench                       # resnet50 inference: GPU if present (bs 256, bf16),
                                                  # else CPU (bs 8, fp32)
    python -m fastres.bench --model resnet50 --batch 1,32,256 --dtype bf16 --mode infer,train \\
        --compare torchvision,compile --json out.json --plot out.png
    python -m fastres.bench --seed-report         # "Forward across 100 steps, X +/- Y sec / batch", ...
    python -m fastres.bench --record-dir benchmarks/results   # JSON + markdown record of the run

Variants: torchvision eager NCHW fp32 and channels_last at --dtype (AMP through autocast),
torch.compile of torchvision (channels_last, --dtype), and fastres on each --backends (channels_last, --dtype).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torchvision

import fastres

from . import seed_report as seed
from .config import (COMPARE, DTYPES, MODELS, MODES, parse_batches, parse_device, parse_list, parse_positive,
                     unrunnable)
from .environment import describe
from ..models.flops import count_macs, forward_flops, training_flops
from .memory import peak_memory_bytes
from .metrics import figures
from .plot import plot_throughput, require_matplotlib
from .progress import Progress
from .record import table, write_record
from .roofline import measured_peak_flops
from .timing import time_round_robin
from .tuning import tuning_table
from .variants import STEPS, CompileUnavailable, Variant, first_call, prepare, running, synthetic_input
from .verify import randomize_batch_norm_, verify_against_torchvision


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastres.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default="resnet50", help=f"one of {', '.join(MODELS)}")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--batch", default=None, help="comma-separated batch sizes (default: 8 on CPU, 256 on GPU)")
    add("--size", default="224", help="input height and width")
    add("--dtype", default=None, help="fp32, or bf16/fp16 through autocast (default: fp32 on CPU, bf16 on GPU)")
    add("--mode", default="infer", help="comma-separated: infer (forward, inference_mode), train (fwd+bwd+SGD)")
    add("--compare", default="torchvision",
        help=f"comma-separated baselines: {', '.join(COMPARE)}, or none")
    add("--backends", default="all", help="comma-separated fastres backends to time, or all (available_backends())")
    add("--warmup", default=None, help="untimed calls per variant (default 2 CPU, 10 GPU)")
    add("--rounds", default=None, help="timed calls per variant (default 5 CPU, 50 GPU)")
    add("--threads", default=None, help="CPU threads (torch.set_num_threads)")
    add("--skip-verify", action="store_true", help="do not check numerics against torchvision first")
    add("--seed-report", action="store_true",
        help="also print 'Forward across N steps, X +/- Y sec / batch' and 'Forward-backward ...' "
             f"(burn-in {seed.FULL[0]}, {seed.FULL[1]} steps; {seed.QUICK[0]} and {seed.QUICK[1]} on a CPU)")
    add("--seed-steps", default=None, help="timed steps of the seed report (overrides the default)")
    add("--json", default=None, help="write the record (environment + every figure) here")
    add("--plot", default=None, help="write a plot of throughput against batch size here (needs matplotlib)")
    add("--record-dir", default=None, help="write the record as JSON + markdown into this folder (benchmarks/results)")
    return parser


@dataclass
class Config:
    model: str
    device: torch.device
    batches: List[int]
    size: int
    dtype: str
    modes: List[str]
    compare: List[str]
    backends: List[str]
    warmup: int
    rounds: int
    threads: Optional[int]
    verify: bool
    seed_report: bool
    seed_steps: Optional[int]
    json: Optional[str]
    plot: Optional[str]
    record_dir: Optional[str]


def build_config(argv=None) -> Config:
    """Parse and check the command line; bad values raise ValueError naming the flag."""
    args = _parser().parse_args(argv)
    if args.model not in MODELS:
        raise ValueError(f"--model: unknown model {args.model!r}; expected one of {list(MODELS)}")
    device = parse_device(args.device)
    on_gpu = device.type == "cuda"
    available = fastres.available_backends()
    if args.backends.strip().lower() == "all":
        backends = available
    else:
        from ..ops.backend import KNOWN_BACKENDS, _WHY_UNAVAILABLE

        backends = parse_list(args.backends, "--backends", KNOWN_BACKENDS)
        for name in backends:
            if name not in available:
                raise ValueError(f"--backends: {name!r} is not available here: "
                                 f"{_WHY_UNAVAILABLE.get(name, 'not built')}; available: {available}")
    compare = [] if args.compare.strip().lower() == "none" else parse_list(args.compare, "--compare", COMPARE)
    config = Config(
        model=args.model, device=device,
        batches=parse_batches(args.batch or ("256" if on_gpu else "8"), "--batch"),
        size=parse_positive(args.size, "--size", minimum=32),
        dtype=_dtype(args.dtype or ("bf16" if on_gpu else "fp32")),
        modes=parse_list(args.mode, "--mode", MODES), compare=compare, backends=backends,
        warmup=parse_positive(args.warmup if args.warmup is not None else (10 if on_gpu else 2), "--warmup", 0),
        rounds=parse_positive(args.rounds if args.rounds is not None else (50 if on_gpu else 5), "--rounds"),
        threads=parse_positive(args.threads, "--threads") if args.threads is not None else None,
        verify=not args.skip_verify, seed_report=args.seed_report,
        seed_steps=parse_positive(args.seed_steps, "--seed-steps") if args.seed_steps is not None else None,
        json=args.json, plot=args.plot, record_dir=args.record_dir)
    last = -(-config.size // 32)  # layer4's height and width
    if "train" in config.modes and min(config.batches) * last * last < 2:
        raise ValueError(f"--batch {min(config.batches)} with --size {config.size} gives training BatchNorm one value "
                         f"per channel in layer4 ({last}x{last}); use a larger batch or size")
    return config


def _dtype(text: str) -> str:
    if text.strip().lower() not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)} (one per run); got {text!r}")
    return text.strip().lower()


def variants(config: Config) -> List[Variant]:
    """The baselines asked for, then fastres on each backend (channels_last, as the fast paths want)."""
    out = []
    if "torchvision" in config.compare:
        out += [Variant("torchvision", "fp32", "nchw"), Variant("torchvision", config.dtype, "channels_last")]
    out += [Variant(impl, config.dtype, "channels_last") for impl in config.compare if impl.startswith("compile")]
    out += [Variant(f"fastres-{name}", config.dtype, "channels_last") for name in config.backends]
    return out


def _speedups(rows: List[dict], dtype: str) -> None:
    """Each row against torchvision NCHW fp32 and torchvision channels_last AMP of its mode and batch."""
    for row in rows:
        for key, name in (("vs_torchvision_nchw", "torchvision nchw fp32"),
                          ("vs_torchvision_channels_last", f"torchvision channels_last {dtype}")):
            base = next((r for r in rows if r["variant"] == name and r["mode"] == row["mode"]
                         and r["batch"] == row["batch"]), None)
            row[key] = base["ms_median"] / row["ms_median"] if base else None


def _verify(config: Config, tv_model, record: dict) -> bool:
    timed = torch.randn(config.batches[0], 3, config.size, config.size, device=config.device)
    checks = verify_against_torchvision(tv_model, torch.randn(2, 3, 64, 64, device=config.device), timed_x=timed,
                                        autocast_dtype=DTYPES[config.dtype])
    also = "" if config.dtype == "fp32" else f", and {config.dtype} autocast"
    print(f"Checking fastres against torchvision (fp32, TF32 off, 2x3x64x64 and the first timed shape{also}):")
    for check in checks:
        print(f"verify {check.what:42s} max rel error {check.error:.2e} "
              f"{'OK' if check.ok else 'FAILED'} (tolerance {check.tolerance:.0e})")
        record["verify"].append({"what": check.what, "error": check.error, "ok": check.ok})
    ok = all(check.ok for check in checks)
    print("numerics match torchvision" if ok else "fastres does NOT match torchvision: not timing it")
    return ok


def _seed_report(config: Config, tv_model, fast_model, record: dict) -> None:
    quick = config.device.type != "cuda"
    burn_in, steps = seed.QUICK if quick else seed.FULL
    steps = config.seed_steps or steps
    batch = config.batches[0]
    note = f" (CPU: {burn_in} burn-in and {steps} timed steps instead of {seed.FULL[0]} and {seed.FULL[1]})" \
        if quick else ""
    print(f"\nSeed report: {config.model}, batch {batch}, {config.size}x{config.size}, {config.dtype}{note}")
    record["seed_report"] = {"batch": batch, "lines": [], "figures": {}}
    pairs = [(Variant("torchvision", "fp32", "nchw"), tv_model)]
    pairs += [(Variant(f"fastres-{config.backends[0]}", config.dtype, "channels_last"), fast_model)] \
        if config.backends else []
    for variant, model in pairs:
        module = prepare(model, model, variant, config.device)
        x = synthetic_input((batch, 3, config.size, config.size), variant, config.device)
        lines, figures_ = seed.seed_report(module, x, burn_in=burn_in, steps=steps,
                                           context=lambda v=variant: running(v, config.device))
        print(f"{variant.name}:")
        for line in lines:
            print(f"  {line}")
        record["seed_report"]["lines"] += [f"{variant.name}: {line}" for line in lines]
        record["seed_report"]["figures"][variant.name] = figures_


def run(config: Config, command: str) -> int:
    if config.threads:
        torch.set_num_threads(config.threads)
    env = describe(config.device)
    print(f"fastres {env['fastres']} ({env['fastres_commit']}) on {env['device']}: torch {env['torch']}, "
          f"torchvision {env['torchvision']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"backends {config.backends}, threads {env['cpu_threads']}")
    torch.manual_seed(0)
    tv_model = randomize_batch_norm_(getattr(torchvision.models, config.model)()).to(config.device).eval()
    record = {"environment": env, "command": command, "model": config.model, "dtype": config.dtype,
              "size": config.size, "batches": config.batches, "modes": config.modes, "compare": config.compare,
              "backends": config.backends, "warmup": config.warmup, "rounds": config.rounds,
              "verify": [], "results": [], "skipped": [], "peak_tflops": {}}
    if config.verify and not _verify(config, tv_model, record):
        return 1
    fast_model = fastres.from_torchvision(tv_model)
    macs = count_macs(tv_model, torch.randn(1, 3, config.size, config.size, device=config.device))
    chosen = variants(config)
    progress = Progress(len(config.modes) * len(config.batches) * len(chosen) * config.rounds, label="timing")
    for mode in config.modes:
        for batch in config.batches:
            steps: Dict[Variant, object] = {}
            first: Dict[Variant, float] = {}
            for variant in chosen:
                why = unrunnable(variant.impl, config.device)
                if why is None:
                    x = synthetic_input((batch, 3, config.size, config.size), variant, config.device)
                    step = STEPS[mode](prepare(tv_model, fast_model, variant, config.device), x, variant)
                    try:
                        first[variant] = first_call(step, variant)
                        steps[variant] = step
                    except CompileUnavailable as error:
                        why = str(error)
                if why is not None:
                    print(f"skipping {variant.name}: {why}", file=sys.stderr)
                    record["skipped"].append({"variant": variant.name, "mode": mode, "batch": batch, "why": why})
                    progress.done += config.rounds
            timings = time_round_robin({v.name: s for v, s in steps.items()}, config.device, warmup=config.warmup,
                                       rounds=config.rounds, on_step=progress.step)
            work = (training_flops if mode == "train" else forward_flops)(macs * batch)
            for variant, step in steps.items():
                timing = timings[variant.name]
                peak = measured_peak_flops(config.device, variant.torch_dtype)
                record["peak_tflops"][variant.dtype] = peak / 1e12
                row = figures(median_s=timing.median, spread_s=timing.spread, images=batch, flops=work,
                              peak_flops=peak, peak_memory=peak_memory_bytes(step, config.device))
                row.update(variant=variant.name, mode=mode, batch=batch, first_call_s=first[variant],
                           rounds_s=timing.seconds)
                record["results"].append(row)
    _speedups(record["results"], config.dtype)
    print(f"\n{config.model}, {config.dtype}, {config.size}x{config.size}, {env['device']}")
    print("\n".join(table(record["results"])))
    record["tuning"] = fastres.tuning_report()
    if record["tuning"]:
        print("\nauto's choices (fastres.tuning_report()):")
        print("\n".join(tuning_table(record["tuning"])))
    if config.seed_report:
        _seed_report(config, tv_model, fast_model, record)
    if config.json:
        with open(config.json, "w") as handle:
            json.dump(record, handle, indent=2)
        print(f"record written to {config.json}")
    if config.record_dir:
        paths = write_record(record, config.record_dir)
        print(f"record written to {paths[0]} and {paths[1]}")
    if config.plot:
        plot_throughput(record["results"], config.plot,
                        f"{config.model} {config.dtype} {config.size}x{config.size} on {env['device']}")
        print(f"plot written to {config.plot}")
    return 0


def main(argv=None) -> int:
    command = "python -m fastres.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        config = build_config(argv)
        if config.plot:
            require_matplotlib()  # before minutes of timing, not after
    except (ValueError, RuntimeError) as error:
        print(f"python -m fastres.bench: error: {error}", file=sys.stderr)
        return 2
    return run(config, command.strip())
