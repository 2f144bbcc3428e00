"""Every Triton kernel, in every tile config the launchers can pick, compiles for sm_90 (H100/H200)
and fits in its shared memory -- checked on this GPU-less machine with Triton's own compiler.

Run as a script (`python tests/test_triton_compile.py`) in a subprocess by the test at the
bottom: the compiler needs real JIT functions, and the rest of the suite imports the kernels
under TRITON_INTERPRET=1, which turns them into interpreter objects for the whole process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HOPPER_TARGET = ("cuda", 90, 32)
HOPPER_SHARED_MEMORY = 232448  # bytes per block (227 KiB)


def _compile(kernel, dtype: str, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    names = fn.arg_names
    signature, attrs = {}, {}
    for index, (name, param) in enumerate(zip(names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}" if name in ("x_ptr", "w_ptr", "x2_ptr", "w2_ptr", "res_ptr", "y_ptr",
                                                      "r_ptr", "dy_ptr", "dx_ptr", "dres_ptr") else "*fp32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in ("momentum", "eps"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget(*HOPPER_TARGET),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _conv_configs(conv):
    """The distinct GPU configs pick_config returns over ResNet-50's conv shapes at batch 1..256."""
    configs = {}
    for m in (49, 3136, 200704, 802816):
        for k_group in (32, 64, 128, 2048):
            for reduction in (27, 147, 576, 4608):
                for element_size in (2, 4):
                    cfg = conv.pick_config(m, k_group, reduction, interpret=False, element_size=element_size)
                    configs[tuple(sorted(cfg.items()))] = cfg
    return list(configs.values())


def compile_everything() -> list:
    """[(name, shared bytes, uses tensor cores)] for every kernel and config."""
    from fastres.kernels.triton import add_relu, batch_norm, conv

    results = []
    configs = _conv_configs(conv)
    largest = max(configs, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"] + c["BLOCK_K"] * (c["BLOCK_M"] + c["BLOCK_N"]))
    # bf16 in every config; fp16 and fp32 (twice the shared memory per tile) in the largest one.
    for dtype, dtype_configs in (("bf16", configs), ("fp16", [largest]), ("fp32", [largest])):
        for cfg in dtype_configs:
            cfg = dict(cfg)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            flags = dict(HAS_SECOND=dtype == "bf16", HAS_BIAS=True, HAS_RESIDUAL=dtype != "bf16", RELU=True,
                         UPCAST=False, PRECISION="tf32" if dtype == "fp32" else "ieee")
            compiled = _compile(conv.conv2d_act_kernel, dtype, {**flags, **cfg}, warps, stages)
            results.append((f"conv {dtype} {cfg}", compiled.metadata.shared, "mma" in compiled.asm["ptx"]))
    for channels in (64, 2048):
        block_r, block_c = batch_norm._tiles(256 * 56 * 56, channels, interpret=False)
        tile = dict(BLOCK_R=block_r, BLOCK_C=block_c)
        for kernel, constexprs in [
            (batch_norm.bn_partial_stats_kernel, tile),
            (batch_norm.bn_finalize_kernel, dict(HAS_WEIGHT=True, HAS_BIAS=True, UPDATE_RUNNING=True,
                                                 BLOCK_C=block_c)),
            (batch_norm.bn_apply_kernel, dict(HAS_RESIDUAL=True, RELU=True, **tile)),
            (batch_norm.bn_backward_reduce_kernel, dict(RELU=True, **tile)),
            (batch_norm.bn_backward_apply_kernel, dict(RELU=True, TRAINING=True, WRITE_DRES=True,
                                                      WRITE_PARAM_GRADS=True, **tile)),
        ]:
            compiled = _compile(kernel, "bf16", constexprs)
            results.append((f"{kernel.__name__} C={channels}", compiled.metadata.shared, None))
    for kernel in (add_relu.add_relu_kernel, add_relu.relu_backward_kernel):
        results.append((kernel.__name__, _compile(kernel, "bf16", {"BLOCK": 1024}).metadata.shared, None))
    return results


def test_every_kernel_config_compiles_for_sm90():
    pytest.importorskip("triton.backends.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) >= 20
    for name, shared, tensor_cores in results:
        assert shared <= HOPPER_SHARED_MEMORY, f"{name} needs {shared} bytes of shared memory"
        assert tensor_cores in (None, True), f"{name}: the GEMM must use tensor cores (mma)"


if __name__ == "__main__":
    print(json.dumps(compile_everything()))
