"""Probe the cuDNN graph ops of fastres._C, one case per process, before anything trusts them.

    python -m fastres.bench.cudnn_probe            # every case, each in its own subprocess
    python -m fastres.bench.cudnn_probe --case I   # one case, in this process

A cuDNN graph that crashes (a segfault inside cudnn-frontend or cuDNN) takes its whole process
with it, so the GPU check (benchmarks/gpu_check.sh) runs this first: each case asks the op's
`_supported` twin, runs the op and compares it with torch's float32 result, printing every step
before taking it (the last line printed names the step that crashed). The exit status is the
number of cases that crashed or gave a wrong answer; the driver prints one verdict line per case.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# (op, dtype, channels_last): ResNet-50's layer1 1x1 conv (64 -> 256 at 56x56, batch 2) for each.
CASES = [
    ("bias_act", torch.float32, False),
    ("bias_act", torch.bfloat16, True),
    ("bias_act", torch.float16, False),
    ("genstats", torch.bfloat16, True),
    ("wgrad", torch.bfloat16, True),
    ("dgrad_drelu", torch.bfloat16, True),
]


def _step(what: str) -> None:
    print(f"[cudnn_probe] {what}", flush=True)


def run_case(index: int, device: str = "cuda", ops=None) -> bool:
    """Runs CASES[index]; True when cuDNN ran it and it matches torch (or cuDNN declines it). `ops`
    stands in for torch.ops.fastres (tests: torch twins of the graph ops, on the CPU)."""
    import fastres  # noqa: F401  (loads fastres._C)

    op, dtype, cl = CASES[index]
    fmt = torch.channels_last if cl else torch.contiguous_format
    _step(f"case {index}: {op} {str(dtype).replace('torch.', '')} {'NHWC' if cl else 'NCHW'}; "
          f"build {fastres.build_info()}; cuDNN {torch.backends.cudnn.version()}")
    g = torch.Generator(device=device).manual_seed(index)
    dev = torch.device(device)

    def rand(*shape):
        t = torch.randn(*shape, generator=g, device=dev, dtype=torch.float32)
        return t.to(dtype).contiguous(memory_format=fmt) if len(shape) == 4 else t

    n, c, k, hw = 2, 64, 256, 56
    x, w = rand(n, c, hw, hw), rand(k, c, 1, 1)
    geometry = ([1, 1], [0, 0], [1, 1], 1)

    def pre(scale, shift):  # the prologue's pre-activation, x * scale + shift, in float32
        return x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    # Per op: its arguments, and compare(out) -> (got, want) against torch in float32.
    if op == "bias_act":
        bias, residual = rand(k), rand(n, k, hw, hw)
        args = (x, w, bias, residual, *geometry, True)

        def compare(out):
            return out.float(), torch.relu(F.conv2d(x.float(), w.float(), bias) + residual.float())
    elif op == "genstats":
        scale, shift = rand(c), rand(c)
        args = (x, w, scale, shift, True, *geometry)

        def compare(out):
            y, total, squares = out
            ref = F.conv2d(torch.relu(pre(scale, shift)).to(dtype).float(), w.float())
            per = ref[0].numel()
            return (torch.cat([y.float().flatten(), total.float().flatten() / per, squares.float().flatten() / per]),
                    torch.cat([ref.flatten(), ref.sum((0, 2, 3)) / per, ref.square().sum((0, 2, 3)) / per]))
    elif op == "wgrad":
        scale, shift, dy = rand(c), rand(c), rand(n, k, hw, hw)
        args = (dy, x, list(w.shape), scale, shift, True, *geometry)

        def compare(out):
            return out.float(), torch.nn.grad.conv2d_weight(torch.relu(pre(scale, shift)), list(w.shape), dy.float())
    else:
        scale, shift, dy = rand(c), rand(c), rand(n, k, hw, hw)
        args = (dy, w, x, scale, shift, *geometry)

        def compare(out):
            masked = torch.nn.grad.conv2d_input(list(x.shape), w.float(), dy.float()) * (pre(scale, shift) > 0)
            return out[0].float().flatten(), masked.flatten()
    ops = torch.ops.fastres if ops is None else ops
    supported, run = (getattr(ops, f"cudnn_conv_{op}{suffix}") for suffix in ("_supported", ""))
    _step(f"cudnn_conv_{op}_supported")
    ok = supported(*args)
    _step(f"supported: {ok}")
    if not ok:
        return True
    _step(f"cudnn_conv_{op}")
    got, want = compare(run(*args))
    _step("synchronize")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    tol = 2e-2 if dtype != torch.float32 else 1e-2  # bf16/fp16 outputs, TF32 allowed or not
    _step(f"max error / max |reference| = {err:.2e} (tolerance {tol:.0e})")
    return err <= tol


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastres.bench.cudnn_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=int, default=None, help="run one case in this process")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per case (driver)")
    args = parser.parse_args(argv)
    if args.case is not None:
        return 0 if run_case(args.case) else 1
    if not torch.cuda.is_available():
        print("[cudnn_probe] no CUDA device: nothing to probe", flush=True)
        return 0
    bad = 0
    for index in range(len(CASES)):
        began = time.monotonic()
        try:
            rc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "fastres.bench.cudnn_probe",
                                 "--case", str(index)], timeout=args.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
        print(verdict_line(index, rc, time.monotonic() - began), flush=True)
        bad += rc != 0
    return min(bad, 100)


def verdict_line(index: int, returncode, seconds: float) -> str:
    """One case's verdict; benchmarks/gpu_check.sh greps "verdict case I ...: crashed" from it."""
    op, dtype, cl = CASES[index]
    if returncode == 0:
        verdict = "ok"
    elif returncode == 1:
        verdict = "failed: wrong answer or an exception (above)"
    elif returncode is None:
        verdict = "crashed (hung: timed out)"
    else:
        verdict = f"crashed (returncode {returncode})"
    return (f"[cudnn_probe] verdict case {index} {op} {str(dtype).replace('torch.', '')} "
            f"{'NHWC' if cl else 'NCHW'}: {verdict} in {seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
