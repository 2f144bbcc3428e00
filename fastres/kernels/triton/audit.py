"""sm_90 compile evidence for every Triton kernel a ResNet launches: compiled, not run.

    python -m fastres.kernels.triton.audit --arch 90 --model resnet50 --batch 1,256 --dtype bf16,fp16 \
        [--mode infer,train] [--configs all|default] --json OUT [--md OUT.md]

The launches are enumerated from the model's modules (a torchvision-layout ResNet built on the
meta device, shapes from forward hooks) and planned by the same code the launchers run
(conv.plan on meta tensors), so grids, strides, flags and tiles are the real ones. Each
launch is compiled with Triton's own binder (ints divisible by 16 marked, ints == 1 made
constants, pointers 16-byte aligned as torch allocations are) for GPUTarget("cuda", arch, 32);
identical specialisations compile once. Registers and spills come from the cubin (cuobjdump's
resource usage; a stack frame counts as a spill only if the SASS touches local memory, STL/LDL), else
ptxas -v on the PTX. Inference: eval-mode BN folded into the convs,
projection blocks as one bottleneck-tail launch; training: the convs' forward launches and
the BN kernels (phase A), and every conv -- the stem, each block conv, each projection -- as a NormConv
launch (op "norm_conv": statistics epilogue, and the previous BN + ReLU as prologue where it has one; its
config says "prologue" / "stats") and its backward (op "norm_conv_backward": the output gradient
gy + a * y + b (the BN apply kernel) where the conv's BN is the next conv's prologue, then the wgrad
and dgrad kernels, "prologue" where they recompute the previous BN + ReLU; the stem's has no dgrad,
since the image needs no gradient). The phase-A convs' backward is aten's, not Triton's.

Must run without TRITON_INTERPRET (the compiler needs real JIT functions).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, List

import torch

GEMM_KERNELS = ("conv2d_act_kernel", "conv2d_wgrad_kernel", "conv2d_dgrad_kernel")
HOPPER_SHARED_MEMORY = 232448  # bytes per block (227 KiB)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------ compiling one launch

def _binder(kernel, backend):
    from triton.runtime.jit import create_function_from_signature
    return create_function_from_signature(kernel.signature, kernel.params, backend)


def _meta_to_mock(arg):
    """Meta tensors stand in for device tensors: Triton specialises pointers on dtype and alignment."""
    if isinstance(arg, torch.Tensor):
        from triton.runtime.jit import MockTensor
        return MockTensor(arg.dtype)  # data_ptr() == 0: 16-byte aligned, as torch's allocations are
    return arg


def compile_launch(launch, arch: int, cache: Dict):
    """(CompiledKernel, specialisation key): the kernel a real launch of `launch` would compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    args = [_meta_to_mock(a) for a in launch.args]
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, specialization, options = _binder(kernel, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (kernel.__name__, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
           repr(sorted(attrs.items(), key=str)), launch.num_warps, launch.num_stages)
    if key not in cache:
        source = ASTSource(kernel, signature, constexprs, attrs)
        cache[key] = triton.compile(source, target=target, options=options.__dict__)
    return cache[key], key


def _tool(name: str):
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


_RESOURCES: Dict = {}


def resources(compiled, arch: int) -> dict:
    """registers and spill bytes of the compiled kernel (from its cubin, else ptxas -v)."""
    ident = id(compiled)
    if ident in _RESOURCES:
        return _RESOURCES[ident]
    out = {"registers": None, "spill_bytes": None, "stack_bytes": None}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = compiled.asm.get("cubin")
        cuobjdump = _tool("cuobjdump")
        text = ""
        if cubin is not None and cuobjdump:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            text = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
            regs = re.search(r"REG:(\d+)", text)
            if regs:
                out["registers"] = int(regs.group(1))
                frame = [int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", text)]
                out["stack_bytes"] = max(frame) if frame else 0
                # A stack frame alone is not a spill (ptxas reserves small frames that nothing uses): a spill
                # is local-memory traffic, STL/LDL in the SASS.
                if out["stack_bytes"]:
                    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
                    out["spill_bytes"] = out["stack_bytes"] if re.search(r"\b(STL|LDL)\b", sass) else 0
                else:
                    out["spill_bytes"] = 0
        if out["registers"] is None and _tool("ptxas"):
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(compiled.asm["ptx"])
            suffix = "a" if arch == 90 else ""
            run = subprocess.run([_tool("ptxas"), f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                                 capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", run.stderr)
            spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", run.stderr)
            frame = re.search(r"(\d+) bytes stack frame", run.stderr)
            if regs:
                out["registers"] = int(regs.group(1))
                out["spill_bytes"] = max(map(int, spills)) if spills else 0
                out["stack_bytes"] = int(frame.group(1)) if frame else 0
    _RESOURCES[ident] = out
    return out


# ------------------------------------------------------------------ the model's launches

def model_calls(model_name: str, batch: int, mode: str, image: int = 224) -> List[dict]:
    """One dict per fastres Triton call the model makes: op, layer name and meta tensors."""
    import torchvision
    model = getattr(torchvision.models, model_name)().to("meta")
    shapes = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: shapes.__setitem__(name, (inp[0].shape,
                                                                                             out.shape)))
             for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    with torch.no_grad():
        model(torch.empty(batch, 3, image, image, device="meta"))
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    calls = []

    def conv(name, relu, residual=False, prologue=None, feeds_prologue=False):
        m = modules[name]
        calls.append(dict(op="conv2d_act", layer=name, x_shape=shapes[name][0], w_shape=tuple(m.weight.shape),
                          stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                          residual=residual and mode == "infer", relu=relu and mode == "infer",
                          bias=mode == "infer", out_shape=shapes[name][1]))
        if mode == "train" and prologue is not None:
            # NormConv (phase B): the same conv emitting its BN statistics, normalising its input when it
            # follows a BN + ReLU inside the block (prologue).
            calls.append(dict(calls[-1], op="norm_conv", prologue=prologue, bias=False, residual=False, relu=False))
            # Its backward: the output gradient's pass where its BN is the next conv's prologue (the
            # statistics' gradient reaches y; a BN applied on its own gives y's whole gradient), then the
            # wgrad and dgrad kernels, recomputing the prologue from the raw input (the stem's input is the
            # image: no dgrad).
            calls.append(dict(calls[-1], op="norm_conv_backward", input_grad=name != "conv1",
                              output_grad=feeds_prologue))
        if mode == "train":
            calls.append(dict(op="batch_norm", layer=name.replace("conv", "bn").replace("downsample.0",
                                                                                       "downsample.1"),
                              shape=shapes[name][1], residual=residual, relu=relu))

    conv("conv1", True, prologue=False)
    for name, m in model.named_modules():
        if type(m).__name__ not in ("Bottleneck", "BasicBlock"):
            continue
        last = "conv3" if hasattr(m, "conv3") else "conv2"
        inner = ["conv1", "conv2"] if last == "conv3" else ["conv1"]
        for index, c in enumerate(inner):
            conv(f"{name}.{c}", True, prologue=index > 0, feeds_prologue=True)
        if m.downsample is not None and mode == "infer" and last == "conv3":
            w3, wd = modules[f"{name}.conv3"], modules[f"{name}.downsample.0"]
            calls.append(dict(op="bottleneck_tail", layer=f"{name}.conv3+downsample",
                              h_shape=shapes[f"{name}.conv3"][0],
                              w3_shape=tuple(w3.weight.shape), x_shape=shapes[f"{name}.downsample.0"][0],
                              wd_shape=tuple(wd.weight.shape), stride=wd.stride))
            continue
        if m.downsample is not None:
            conv(f"{name}.downsample.0", False, prologue=False)
        conv(f"{name}.{last}", True, residual=True, prologue=True)
    return calls


def _meta(shape, dtype, channels_last=True):
    t = torch.empty(shape, device="meta", dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if len(shape) == 4 and channels_last else t


def plans(call: dict, dtype, config_mode: str):
    """[(config, [Launch])] for one call in each configuration auto may pick."""
    from . import conv
    if call["op"] == "batch_norm":
        return [("", batch_norm_launches(call, dtype))]
    if call["op"] in ("norm_conv", "norm_conv_backward"):
        x, w = _meta(call["x_shape"], dtype), _meta(call["w_shape"], dtype, channels_last=False)
        channels = call["x_shape"][1]
        prologue = ((_meta((channels,), torch.float32), _meta((channels,), torch.float32), True)
                    if call["prologue"] else None)
        if call["op"] == "norm_conv_backward":
            from . import conv_backward
            conv_args = (tuple(call["stride"]), tuple(call["padding"]), tuple(call["dilation"]), call["groups"])
            from . import batch_norm as bn
            g = _meta(call["out_shape"], dtype)
            per_channel = _meta((call["out_shape"][1],), torch.float32)
            # d loss / d y = gy + a * y + b first (the BN apply kernel, gy as its residual), then wgrad, dgrad
            output_grad = bn.apply_plan(g, per_channel, per_channel, g, False)[1] if call["output_grad"] else []
            tiles = [""] + (conv_backward.backward_configs(x, w, call["groups"]) if config_mode == "all" else [])
            out = []
            for cfg in tiles:  # the output gradient's pass once, with the default tiles
                dgrad = (conv_backward.dgrad_plan(g, x, w, *conv_args, prologue, config=cfg)[1]
                         if call["input_grad"] else [])
                wgrad = conv_backward.wgrad_plan(g, x, w, *conv_args, prologue, config=cfg)[1]
                out.append((cfg, (output_grad if not cfg else []) + wgrad + dgrad))
            return out
        args = (x, w, None, tuple(call["stride"]), tuple(call["padding"]), tuple(call["dilation"]), call["groups"],
                None, False)
        cfgs = conv.configs(*args[:2], *args[3:7], prologue=prologue is not None)
        return [(cfg, conv.plan(*args, config=cfg, prologue=prologue, stats=True)[1])
                for cfg in (cfgs if config_mode == "all" else [""])]
    if call["op"] == "conv2d_act":
        x, w = _meta(call["x_shape"], dtype), _meta(call["w_shape"], dtype, channels_last=False)
        bias = _meta((call["w_shape"][0],), dtype) if call["bias"] else None
        residual = _meta(call["out_shape"], dtype) if call["residual"] else None
        args = (x, w, bias, tuple(call["stride"]), tuple(call["padding"]), tuple(call["dilation"]), call["groups"],
                residual, call["relu"])
        cfgs = conv.configs(*args[:2], *args[3:7])
        return [(cfg, conv.plan(*args, config=cfg)[1]) for cfg in (cfgs if config_mode == "all" else [""])]
    h, x = _meta(call["h_shape"], dtype), _meta(call["x_shape"], dtype)
    w3, wd = _meta(call["w3_shape"], dtype, False), _meta(call["wd_shape"], dtype, False)
    bias = _meta((call["w3_shape"][0],), dtype)
    cfgs = conv.configs(h, w3, second_channels=call["wd_shape"][1])
    return [(cfg, conv.plan(h, w3, bias, (1, 1), (0, 0), (1, 1), 1, None, True, second=(x, wd, tuple(call["stride"])),
                            config=cfg)[1]) for cfg in (cfgs if config_mode == "all" else [""])]


def batch_norm_launches(call: dict, dtype) -> list:
    """The BN training launches (stats, finalize, apply, backward reduce/finalize/apply) at this shape."""
    import triton

    from . import batch_norm as bn
    from .conv import Launch
    shape = call["shape"]
    x = _meta(shape, dtype)
    n, c, h, w = shape
    rows = n * h * w
    block_r, block_c = bn._tiles(rows, c, False)
    tiles = triton.cdiv(c, block_c)
    rows_per_program, chunks = bn._chunking(rows, block_r, tiles, False)
    f = lambda *s: torch.empty(s, device="meta", dtype=torch.float32)  # noqa: E731
    part, vec = f(chunks, c), f(c)
    (_, _, l), xs = bn._view3(x)
    tile = dict(BLOCK_R=block_r, BLOCK_C=block_c)
    row_grid = (triton.cdiv(rows, block_r), tiles)
    return [
        Launch(bn.batch_norm_act_stats_kernel, (chunks, tiles),
               [x, part, part, part, rows, c, l, *xs, rows_per_program], tile, 4, 3),
        Launch(bn.batch_norm_act_finalize_kernel, (tiles,),
               [part, part, part, chunks, c, *[vec] * 8, 0.1, 1e-5],
               dict(HAS_WEIGHT=True, HAS_BIAS=True, UPDATE_RUNNING=True, BLOCK_C=block_c), 4, 3),
        *bn.apply_plan(x, vec, vec, x if call["residual"] else None, call["relu"])[1],
        Launch(bn.batch_norm_act_backward_reduce_kernel, (chunks, tiles),
               [x, x, x, vec, vec, part, part, rows, c, l, *xs, *xs, *xs, rows_per_program],
               dict(RELU=call["relu"], **tile), 4, 3),
        Launch(bn.batch_norm_act_backward_finalize_kernel, (triton.cdiv(c, 64),), [part, part, chunks, c, vec, vec],
               dict(BLOCK_C=64), 4, 3),
        Launch(bn.batch_norm_act_backward_apply_kernel, row_grid,
               [x, x, x, vec, vec, vec, vec, vec, x, x, rows, c, l, *xs, *xs, *xs, *xs],
               dict(RELU=call["relu"], TRAINING=True, WRITE_DRES=call["residual"], **tile), 4, 3),
    ]


# ------------------------------------------------------------------ the audit

def audit(model: str = "resnet50", batches=(1, 256), dtypes=("bf16", "fp16"), modes=("infer",), arch: int = 90,
          config_mode: str = "all", layers=None, progress=None) -> List[dict]:
    cache: Dict = {}
    rows = []
    for mode in modes:
        for batch in batches:
            calls = model_calls(model, batch, mode)
            if layers is not None:
                calls = [c for c in calls if c["layer"] in layers]
            for dtype_name in dtypes:
                dtype = _DTYPES[dtype_name]
                for call in calls:
                    for config, launches in plans(call, dtype, config_mode):
                        for launch in launches:
                            compiled, _ = compile_launch(launch, arch, cache)
                            ptx = compiled.asm["ptx"]
                            is_gemm = launch.kernel.__name__ in GEMM_KERNELS
                            row = dict(layer=call["layer"], mode=mode, op=call["op"], kernel=launch.kernel.__name__,
                                       batch=batch, dtype=dtype_name, config=(config or "(default)") + _variant(launch),
                                       tile=_tile(launch), grid=list(launch.grid),
                                       **resources(compiled, arch), shared_bytes=compiled.metadata.shared,
                                       wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
                                       tma="cp.async.bulk.tensor" in ptx,
                                       cp_async_16="cp.async.cg.shared.global" in ptx,  # cg: 16-byte only
                                       mma_work_ratio=(round(launch.mma_issued / launch.mma_useful, 3)
                                                       if is_gemm and launch.mma_useful else None))
                            rows.append(row)
                            if progress:
                                progress(row)
    return rows


def _variant(launch) -> str:
    """" prologue", " stats", " prologue+stats": the NormConv switches a launch was compiled with."""
    tags = [name.lower() for name in ("PROLOGUE", "STATS") if launch.constexprs.get(name)]
    return " " + "+".join(tags) if tags else ""


def _tile(launch) -> str:
    c = launch.constexprs
    keys = [k for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "PACKED", "BLOCK_R", "BLOCK_C") if k in c]
    return " ".join(f"{k}={c[k]}" for k in keys) + f" w{launch.num_warps} s{launch.num_stages}"


def markdown(rows: List[dict], command: str) -> str:
    lines = ["# Triton kernels for sm_90: compile audit (compiled for sm_90, not run)", "",
             f"`{command}`", "",
             "Compiled on a GPU-less machine with Triton's own launch specialisation; nothing here was run on a GPU,",
             "so there are no speeds. registers/spills from the cubin; shared = bytes per block (sm_90 max 232448).",
             "", "| mode | batch | dtype | layer | kernel | config | tile | regs | spill | smem | wgmma | tma | "
             "mma work ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['dtype']} | {r['layer']} | {r['kernel']} | {r['config']} | "
                     f"{r['tile']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                     f"{'yes' if r['wgmma'] else 'no'} | {'yes' if r['tma'] else 'no'} | "
                     f"{'' if r['mma_work_ratio'] is None else r['mma_work_ratio']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the audit compiles real kernels")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", default="1,256")
    p.add_argument("--dtype", default="bf16,fp16")
    p.add_argument("--mode", default="infer")
    p.add_argument("--configs", choices=("all", "default"), default="all",
                   help="every configuration auto may pick (configs()), or the static heuristic only")
    p.add_argument("--layers", default=None, help="comma-separated layer names (default: all)")
    p.add_argument("--json", required=True)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    rows = audit(a.model, [int(b) for b in a.batch.split(",")], a.dtype.split(","), a.mode.split(","), a.arch,
                 a.configs, a.layers.split(",") if a.layers else None)
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)
    if a.md:
        command = "python -m fastres.kernels.triton.audit " + " ".join(argv if argv is not None else
                                                                      __import__("sys").argv[1:])
        with open(a.md, "w") as f:
            f.write(markdown(rows, command))
    convs = [r for r in rows if r["kernel"] in GEMM_KERNELS]
    print(f"{len(rows)} launches ({len(convs)} conv): wgmma {sum(r['wgmma'] for r in convs)}/{len(convs)}, "
          f"max regs {max((r['registers'] or 0) for r in rows)}, spilling {sum(bool(r['spill_bytes']) for r in rows)}, "
          f"max smem {max(r['shared_bytes'] for r in rows)}, "
          f"max mma ratio {max((r['mma_work_ratio'] or 0) for r in convs) if convs else None}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
