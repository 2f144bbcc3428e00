"""batch_norm_act (BatchNorm + residual + ReLU, training and eval, running-stat updates) across
implementations: every available backend (auto, the torch reference, cpp, triton) against
torch.nn.BatchNorm2d in float64, running buffers included, and a float64 gradcheck in training; the cpp
backend's float64 gradchecks, its CPU kernels against float64 in fp32/bf16, its results whatever the
thread count, and its CUDA kernels' vectorised and scalar paths against float64 (on a GPU only); the
Triton kernels (in Triton's interpreter without a GPU) against the torch backend, outputs, gradients and
running buffers, and their batch statistics bit for bit from run to run. Its bad-input cases are in
tests/test_conv2d_act.py's table."""
from __future__ import annotations

import pytest
import torch

import fastres
from fastres import ops
from fastres.ops import registry

from helpers import LAYOUTS, TRITON_DEVICE as DEVICE, cpp_only, randn as _randn, randn64, triton_only, \
    triton_randn
from reference_math import assert_close, grads as _grads, random_bn_state

BACKENDS = fastres.available_backends()


def _bn_module(channels, momentum, seed=0):
    bn = torch.nn.BatchNorm2d(channels, momentum=momentum).double()
    gamma, beta, mean, var = random_bn_state(channels, torch.Generator().manual_seed(seed), torch.float64)
    with torch.no_grad():
        bn.weight.copy_(gamma), bn.bias.copy_(beta), bn.running_mean.copy_(mean), bn.running_var.copy_(var)
    return bn


# ------------------------------------------------------------------ every backend against BatchNorm2d

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("shape", [(3, 13, 7, 9), (1, 40, 13, 17), (3, 24, 1, 1)])
def test_batch_norm_act_matches_batchnorm2d(shape, residual, relu, training, layout, backend):
    x = _randn(*shape, layout=layout, seed=1) * 3 + 0.5
    res = _randn(*shape, layout=layout, seed=2) if residual else None
    reference_bn = _bn_module(shape[1], 0.3)
    reference_bn.train(training)
    expected = reference_bn(x.double())
    if res is not None:
        expected = expected + res.double()
    expected = torch.relu(expected) if relu else expected
    bn = _bn_module(shape[1], 0.3).float()
    with fastres.use_backend(backend):
        y = ops.batch_norm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=training,
                               momentum=0.3, eps=bn.eps, residual=res, relu=relu)
    assert y.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(y, expected, torch.float32, "output")
    assert_close(bn.running_mean, reference_bn.running_mean, torch.float32, "running_mean")
    assert_close(bn.running_var, reference_bn.running_var, torch.float32, "running_var (unbiased)")


def test_batch_norm_act_gradients_in_training():
    x = _randn(3, 5, 4, 3, dtype=torch.float64, seed=1).requires_grad_()
    res = _randn(3, 5, 4, 3, dtype=torch.float64, seed=2).requires_grad_()
    g = torch.Generator().manual_seed(0)
    gamma, beta, _, _ = random_bn_state(5, g, torch.float64)
    gamma.requires_grad_(), beta.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: ops.batch_norm_act(a, c, d, None, None, training=True, residual=b, relu=True),
        (x, res, gamma, beta))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 13, 7, 9), (1, 40, 13, 17)])
def test_given_batch_statistics_give_batchnorm2d_and_its_gradient(shape, layout, backend):
    # The NormConv chain's last BN gets y's statistics from the conv's epilogue: the apply alone must
    # give nn.BatchNorm2d's training output and BN's full training gradient, with the statistics made
    # differentiably from x (as norm_conv's are) or not.
    x = (_randn(*shape, layout=layout, seed=1) * 3 + 0.5).requires_grad_()
    res = _randn(*shape, layout=layout, seed=2).requires_grad_()
    bn = _bn_module(shape[1], 0.3).float()
    dy = _randn(*shape, layout=layout, seed=3)
    x64, res64 = x.detach().double().requires_grad_(), res.detach().double().requires_grad_()
    bn64 = _bn_module(shape[1], 0.3)
    expected = torch.relu(bn64(x64) + res64)
    expected.backward(dy.double())
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    with fastres.use_backend(backend):
        y = ops.batch_norm_act(x, bn.weight, bn.bias, None, None, training=True, eps=bn.eps, residual=res, relu=True,
                               mean=mean, invstd=torch.rsqrt(var + bn.eps))
    y.backward(dy)
    assert y.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(y, expected, torch.float32, "output")
    for got, want, what in ((x.grad, x64.grad, "x"), (res.grad, res64.grad, "residual"),
                            (bn.weight.grad, bn64.weight.grad, "weight"), (bn.bias.grad, bn64.bias.grad, "bias")):
        assert_close(got, want, torch.float32, f"d{what}")
    # the given statistics are the ones used (no statistics pass of its own): shift them, see it
    shifted, invstd = mean.detach() + 1.0, torch.rsqrt(var.detach() + bn.eps)
    with torch.no_grad(), fastres.use_backend(backend):
        y = ops.batch_norm_act(x, bn.weight, bn.bias, None, None, training=True, eps=bn.eps, residual=res, relu=True,
                               mean=shifted, invstd=invstd)
    view = (1, -1, 1, 1)
    expected = torch.relu((x64 - shifted.double().view(view)) * (invstd.double() * bn64.weight).view(view)
                          + bn64.bias.view(view) + res64)
    assert_close(y, expected.detach(), torch.float32, "output with shifted statistics")


@pytest.mark.parametrize("kwargs,message", [
    (dict(mean=torch.zeros(5)), "together"),
    (dict(mean=torch.zeros(5), invstd=torch.ones(5), training=False, running_mean=torch.zeros(5),
          running_var=torch.ones(5)), "training=True"),
    (dict(mean=torch.zeros(5), invstd=torch.ones(5), running_mean=torch.zeros(5), running_var=torch.ones(5)),
     "must be None"),
    (dict(mean=torch.zeros(4), invstd=torch.ones(4)), "mean"),
])
def test_given_batch_statistics_bad_input(kwargs, message):
    args = dict(running_mean=None, running_var=None, training=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ops.batch_norm_act(torch.randn(2, 5, 3, 3), None, None, args.pop("running_mean"), args.pop("running_var"),
                           **args)


# ------------------------------------------------------------------ cpp (fastres._C: CPU and CUDA kernels)

@cpp_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_batch_norm_act_gradcheck(residual, relu, training, layout):
    x = randn64(3, 5, 4, 3, layout=layout, seed=1, scale=2.0).requires_grad_()
    res = randn64(3, 5, 4, 3, layout=layout, seed=2).requires_grad_() if residual else None
    gamma, beta, mean, var = random_bn_state(5, torch.Generator().manual_seed(0), torch.float64)
    gamma.requires_grad_(), beta.requires_grad_()

    def fn(x, gamma, beta, res):
        return ops.batch_norm_act(x, gamma, beta, mean.clone(), var.clone(), training=training, residual=res,
                                  relu=relu)

    with fastres.use_backend("cpp"):
        assert torch.autograd.gradcheck(fn, (x, gamma, beta, res))


@cpp_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 13, 7, 9), (1, 40, 13, 17), (3, 24, 1, 1)])
def test_batch_norm_act_matches_float64(shape, dtype, layout):
    x = randn64(*shape, dtype=dtype, layout=layout, seed=1, scale=3.0) + 0.5
    res = randn64(*shape, dtype=dtype, layout=layout, seed=2)
    gamma, beta, mean, var = random_bn_state(shape[1], torch.Generator().manual_seed(0))
    rm, rv = mean.clone(), var.clone()
    with fastres.use_backend("cpp"):
        y = ops.batch_norm_act(x, gamma, beta, rm, rv, training=True, momentum=0.3, residual=res, relu=True)
    rm64, rv64 = mean.double(), var.double()
    expected = torch.relu(torch.nn.functional.batch_norm(x.double(), rm64, rv64, gamma.double(), beta.double(),
                                                         True, 0.3, 1e-5) + res.double())
    assert y.dtype == dtype and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(y, expected, dtype, "output")
    assert_close(rm, rm64, torch.float32, "running_mean")
    assert_close(rv, rv64, torch.float32, "running_var")


@cpp_only
def test_results_do_not_depend_on_thread_count():
    x = randn64(4, 24, 17, 13, dtype=torch.float32, layout="channels_last", seed=3, scale=5.0) + 2.0
    gamma, beta, _, _ = random_bn_state(24, torch.Generator().manual_seed(0))
    dy = randn64(4, 24, 17, 13, dtype=torch.float32, layout="channels_last", seed=4)

    def run():
        xg = x.clone().requires_grad_()
        with fastres.use_backend("cpp"):
            y = ops.batch_norm_act(xg, gamma, beta, None, None, training=True)
        y.backward(dy)
        return y.detach(), xg.grad

    threads = torch.get_num_threads()
    try:
        first = run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    again = run()
    for a, b, c in zip(first, single, again):
        assert torch.equal(a, b) and torch.equal(a, c)


@cpp_only
@pytest.mark.skipif(not (torch.cuda.is_available()
                         and torch._C._dispatch_has_kernel_for_dispatch_key("fastres::batch_norm_act_apply", "CUDA")),
                    reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64, 13, 17), (2, 40, 7, 9), (1, 24, 1, 1), (2, 2048, 3, 3), (2, 3000, 2, 3)])
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_batch_norm_act_and_backward_match_float64(shape, dtype, layout, offset):
    """The CUDA kernels' vectorised (128-bit, shared-memory staged) and scalar paths: offset 1
    misaligns the storage (scalar path); C = 3000 is too many channels to stage."""
    def on_gpu(t):
        flat = torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")
        view = flat[offset:].view(t.permute(0, 2, 3, 1).shape if layout == "channels_last" else t.shape)
        view = view.permute(0, 3, 1, 2) if layout == "channels_last" else view
        return view.copy_(t)

    x64 = randn64(*shape, layout=layout, seed=1, scale=3.0) + 0.5
    dy64 = randn64(*shape, layout=layout, seed=2)
    gamma, beta, mean, var = random_bn_state(shape[1], torch.Generator().manual_seed(0))
    x = on_gpu(x64.to(dtype)).requires_grad_()
    rm, rv = mean.cuda(), var.cuda()
    with fastres.use_backend("cpp"):
        y = ops.batch_norm_act(x, gamma.cuda(), beta.cuda(), rm, rv, training=True, momentum=0.3, relu=True)
    y.backward(on_gpu(dy64.to(dtype)))
    xr = x64.to(dtype).double().requires_grad_()
    rm64, rv64 = mean.double(), var.double()
    ref = torch.relu(torch.nn.functional.batch_norm(xr, rm64, rv64, gamma.double(), beta.double(), True, 0.3, 1e-5))
    ref.backward(dy64.to(dtype).double())
    assert_close(y.cpu(), ref, dtype, "output")
    assert_close(x.grad.cpu(), xr.grad, dtype, "grad")
    assert_close(rm.cpu(), rm64, torch.float32, "running_mean")
    assert_close(rv.cpu(), rv64, torch.float32, "running_var")


# ------------------------------------------------------------------ triton (the interpreter without a GPU)

@triton_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("shape", [(3, 13, 7, 9), (1, 40, 13, 17), (3, 70, 1, 1)])
def test_batch_norm_act_forward_backward(shape, residual, relu, training, layout, poisoned_outputs):
    x = triton_randn(*shape, layout=layout, seed=1, scale=3.0) + 0.5
    res = triton_randn(*shape, layout=layout, seed=2) if residual else None
    gamma, beta, mean, var = (t.to(DEVICE) for t in random_bn_state(shape[1], torch.Generator().manual_seed(0)))
    buffers = {backend: (mean.clone(), var.clone()) for backend in ("triton", "torch")}

    def fn_for(backend):
        def fn(x, gamma, beta, res):
            rm, rv = buffers[backend]
            return fastres.ops.batch_norm_act(x, gamma, beta, rm, rv, training=training, momentum=0.3, eps=1e-5,
                                              residual=res, relu=relu)
        return fn

    with fastres.use_backend("triton"):
        out, grads = _grads(fn_for("triton"), [x, gamma, beta, res])
    buffers["torch"] = (mean.double(), var.double())
    with fastres.use_backend("torch"):
        ref, ref_grads = _grads(fn_for("torch"), [t.double() if t is not None else None for t in [x, gamma, beta, res]])
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(out, ref, torch.float32, "output")
    for name, g, r in zip(["x", "weight", "bias", "residual"], grads, ref_grads):
        if r is not None:
            assert_close(g, r, torch.float32, f"grad {name}") if r.abs().max() > 0 else None
    assert_close(buffers["triton"][0], buffers["torch"][0], torch.float32, "running_mean")
    assert_close(buffers["triton"][1], buffers["torch"][1], torch.float32, "running_var")


@triton_only
def test_batch_norm_statistics_are_deterministic():
    x = triton_randn(4, 24, 17, 13, seed=3, scale=5.0) + 2.0
    first = registry.triton_batch_norm_act_stats(x, None, None, 0.1, 1e-5)
    again = registry.triton_batch_norm_act_stats(x, None, None, 0.1, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
