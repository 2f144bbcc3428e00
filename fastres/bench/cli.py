"""`python -m fastres.bench`: check fastres against torchvision, then time both side by side.

    python -m fastres.bench                              # resnet50 inference, GPU if present, else CPU
    python -m fastres.bench --model resnet18 --batch 1,8 --dtype fp32 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Callable, Dict

import torch
import torchvision

import fastres

from .environment import describe
from .progress import Progress
from .timing import time_round_robin
from .verify import randomize_batch_norm_, verify_against_torchvision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
          "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastres.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=MODELS)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes (default: 8 on CPU, 256 on GPU)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="fp32, or bf16/fp16 through autocast (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per candidate (default 2 CPU, 10 GPU)")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per candidate (default 5 CPU, 50 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--skip-verify", action="store_true", help="do not check numerics against torchvision first")
    parser.add_argument("--json", default=None, help="write the record (environment + every figure) here")
    return parser.parse_args(argv)


def _candidates(tv_model, fast_model, x, dtype, device) -> Dict[str, Callable[[], object]]:
    tv_cl = copy.deepcopy(tv_model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    autocast = dtype != torch.float32

    def run(model, inp):
        def call():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
                return model(inp)
        return call

    return {
        "torchvision NCHW": run(tv_model, x),
        "torchvision channels_last": run(tv_cl, x_cl),
        f"fastres ({fastres.get_backend()})": run(fast_model, x),
    }


def main(argv=None) -> int:
    args = _parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    batches = [int(b) for b in (args.batch or ("256" if on_gpu else "8")).split(",")]
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    rounds = args.rounds if args.rounds is not None else (50 if on_gpu else 5)
    env = describe(device)
    print(f"fastres {env['fastres']} ({env['fastres_commit']}) on {env['device']}: torch {env['torch']}, "
          f"torchvision {env['torchvision']}, triton {env['triton']}, backend {env['backend']}, "
          f"threads {env['cpu_threads']}")

    torch.manual_seed(0)
    tv_model = randomize_batch_norm_(getattr(torchvision.models, args.model)()).to(device).eval()
    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    record = {"environment": env, "model": args.model, "dtype": dtype_name,
              "size": args.size, "verify": [], "results": []}

    if not args.skip_verify:
        checks = verify_against_torchvision(tv_model, torch.randn(2, 3, 64, 64, device=device))
        for check in checks:
            print(f"verify {check.what:42s} max rel error {check.error:.2e} "
                  f"{'OK' if check.ok else 'FAILED'} (tolerance {check.tolerance:.0e})")
            record["verify"].append({"what": check.what, "error": check.error, "ok": check.ok})
        if not all(check.ok for check in checks):
            print("fastres does not match torchvision: not timing it", file=sys.stderr)
            return 1

    fast_model = fastres.from_torchvision(tv_model)
    rows = []
    progress = Progress(len(batches) * 3 * rounds, label="timing")
    for batch in batches:
        x = torch.randn(batch, 3, args.size, args.size, device=device)
        timings = time_round_robin(_candidates(tv_model, fast_model, x, dtype, device), device, warmup=warmup,
                                   rounds=rounds, on_step=progress.step)
        baseline = timings["torchvision NCHW"].median
        channels_last = timings["torchvision channels_last"].median
        for name, timing in timings.items():
            row = {"variant": name, "batch": batch, "ms_median": timing.median * 1e3, "ms_spread": timing.spread * 1e3,
                   "img_per_s": batch / timing.median, "vs_torchvision_nchw": baseline / timing.median,
                   "vs_torchvision_channels_last": channels_last / timing.median, "rounds_s": timing.seconds}
            rows.append(row)
    record["results"] = rows
    print(f"\n{args.model} inference, {record['dtype']}, {args.size}x{args.size}, {env['device']}")
    print(f"| {'variant':28s} | batch | ms/batch (median +/- sd) | img/s   | vs tv NCHW | vs tv channels_last |")
    print(f"|{'-' * 30}|-------|--------------------------|---------|------------|---------------------|")
    for r in rows:
        print(f"| {r['variant']:28s} | {r['batch']:5d} | {r['ms_median']:10.2f} +/- {r['ms_spread']:8.2f}  | "
              f"{r['img_per_s']:7.1f} | {r['vs_torchvision_nchw']:9.2f}x | {r['vs_torchvision_channels_last']:18.2f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)
        print(f"record written to {args.json}")
    return 0
