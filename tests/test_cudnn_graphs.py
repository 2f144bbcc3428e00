"""fastres._C's cuDNN graphs (csrc/cuda/cudnn_graphs.cpp) and batch_norm_finalize.

Everywhere: the operators exist with their schemas, their fake implementations, opcheck,
build_info() against what the binary registers, the finalize math against nn.BatchNorm2d.
On a GPU: every graph against float64 references in float32 / float16 / bfloat16 and both
layouts, at ResNet and odd shapes, genstats and the prologue, the tail's two graphs, running
buffers, CUDA graph capture and no host synchronisation.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres.ops import compiled, dispatch, implementations, reference  # noqa: F401  (fills the table)

from helpers import LAYOUTS, TOLERANCE, randn as _randn
from reference_math import assert_close

pytestmark = pytest.mark.skipif("cpp" not in fastres.available_backends(), reason="fastres._C is not built")

FR = torch.ops.fastres if "cpp" in fastres.available_backends() else None
GRAPHS = fastres.build_info()["cudnn_graphs"]
ON_GPU = torch.cuda.is_available() and GRAPHS
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device and fastres._C built with the cuDNN graphs")

SCHEMAS = {
    "cudnn_conv_bias_act": "fastres::cudnn_conv_bias_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, "
                           "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor",
    "cudnn_conv_bias_act_supported": "fastres::cudnn_conv_bias_act_supported(Tensor x, Tensor weight, Tensor? bias, "
                                     "Tensor? residual, int[2] stride, int[2] padding, int[2] dilation, int groups, "
                                     "bool relu) -> bool",
    "cudnn_conv_genstats": "fastres::cudnn_conv_genstats(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, "
                           "bool prologue_relu, int[2] stride, int[2] padding, int[2] dilation, int groups) -> "
                           "(Tensor, Tensor, Tensor)",
    "cudnn_conv_wgrad": "fastres::cudnn_conv_wgrad(Tensor grad, Tensor x, int[4] weight_size, Tensor? scale, "
                        "Tensor? shift, bool prologue_relu, int[2] stride, int[2] padding, int[2] dilation, "
                        "int groups) -> Tensor",
    "cudnn_conv_dgrad_drelu": "fastres::cudnn_conv_dgrad_drelu(Tensor grad, Tensor weight, Tensor x, Tensor scale, "
                              "Tensor shift, int[2] stride, int[2] padding, int[2] dilation, int groups) -> "
                              "(Tensor, Tensor, Tensor)",
    "batch_norm_finalize": "fastres::batch_norm_finalize(Tensor sum, Tensor sqsum, int count, Tensor? weight, "
                           "Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
                           "float eps) -> (Tensor, Tensor, Tensor, Tensor)",
}




# ------------------------------------------------------------------ everywhere (no GPU needed)

@pytest.mark.parametrize("name", SCHEMAS)
def test_operator_schemas(name):
    assert str(getattr(FR, name).default._schema) == SCHEMAS[name]


def test_build_info_matches_the_binary():
    info = fastres.build_info()
    assert set(info) >= {"cuda_kernels", "cudnn_graphs", "cudnn_frontend_version", "archs", "iostreams_ok"}
    assert info["iostreams_ok"] is (True if info["extension"] else None)
    assert "build_info" in fastres.__all__
    assert info["cuda_kernels"] == torch._C._dispatch_has_kernel_for_dispatch_key("fastres::add_relu", "CUDA")
    assert info["cudnn_graphs"] == torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastres::cudnn_conv_bias_act", "CUDA")
    assert info["cudnn_graphs"] == compiled.cudnn_graphs_built()
    if info["cudnn_graphs"]:
        assert info["cuda_kernels"]
        assert re.fullmatch(r"\d+\.\d+\.\d+", info["cudnn_frontend_version"])
        assert info["cudnn_compiled_version"] >= 90000
    else:
        assert info["cudnn_frontend_version"] is None
    if info["cuda_kernels"]:
        assert info["archs"] and all(re.fullmatch(r"sm_\d+", a) for a in info["archs"])
        wanted = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if wanted and "+PTX" not in wanted:  # built with an explicit list: exactly those
            expected = {"sm_" + a.replace(".", "") for a in re.split(r"[;\s]+", wanted.strip()) if a}
            assert set(info["archs"]) == expected
    else:
        assert info["archs"] == []


@pytest.mark.skipif(not torch._C._dispatch_has_kernel_for_dispatch_key("fastres::add_relu", "CUDA")
                    if FR is not None else True, reason="built without CUDA")
@pytest.mark.skipif(os.environ.get("FASTRES_SKIP_CUDNN") == "1", reason="built without the cuDNN graphs on purpose")
def test_cuda_build_has_the_cudnn_graphs_when_the_frontend_is_installed():
    """setup.py must find the nvidia-cudnn-frontend wheel's headers when the wheel is installed."""
    try:
        import cudnn  # noqa: F401  (the frontend's Python module ships in the same wheel)
    except ImportError:
        pytest.skip("nvidia-cudnn-frontend is not installed")
    assert fastres.build_info()["cudnn_graphs"]


def test_runtime_switch_turns_the_graphs_off(monkeypatch):
    """FASTRES_CUDNN_GRAPHS=0 makes every cuDNN graph "not covered" without a rebuild (what the GPU
    check does after its probe crashed); any other value leaves the build's answer."""
    built = fastres.build_info()["cudnn_graphs"]
    monkeypatch.setenv("FASTRES_CUDNN_GRAPHS", "0")
    assert not compiled.cudnn_graphs_built()
    x = _randn(1, 8, 5, 5).to("meta")
    assert not compiled.cudnn_graph_covers(x, x.new_empty(8, 8, 1, 1), None, (1, 1), (0, 0), (1, 1), 1, None, False)
    monkeypatch.setenv("FASTRES_CUDNN_GRAPHS", "1")
    assert compiled.cudnn_graphs_built() == built


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_implementations_on_meta_tensors(layout):
    x = torch.empty(3, 24, 13, 17, device="meta").contiguous(memory_format=LAYOUTS[layout])
    w = torch.empty(40, 24, 3, 3, device="meta")
    r = torch.empty(3, 40, 7, 9, device="meta").contiguous(memory_format=LAYOUTS[layout])
    y = FR.cudnn_conv_bias_act(x, w, torch.empty(40, device="meta"), r, [2, 2], [1, 1], [1, 1], 1, True)
    assert y.shape == (3, 40, 7, 9) and y.is_contiguous(memory_format=LAYOUTS[layout])
    y, s, q = FR.cudnn_conv_genstats(x, w, torch.empty(24, device="meta"), torch.empty(24, device="meta"), True,
                                     [1, 1], [1, 1], [1, 1], 1)
    assert y.shape == (3, 40, 13, 17) and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert s.shape == q.shape == (40,) and s.dtype == q.dtype == torch.float32
    outs = FR.batch_norm_finalize(torch.empty(40, device="meta"), torch.empty(40, device="meta"), 100, None, None,
                                  None, None, 0.1, 1e-5)
    assert [o.shape for o in outs] == [(40,)] * 4
    dy = torch.empty(3, 40, 7, 9, device="meta").contiguous(memory_format=LAYOUTS[layout])
    scale, shift = torch.empty(24, device="meta"), torch.empty(24, device="meta")
    dw = FR.cudnn_conv_wgrad(dy, x, [40, 24, 3, 3], scale, shift, True, [2, 2], [1, 1], [1, 1], 1)
    assert dw.shape == (40, 24, 3, 3) and dw.dtype == x.dtype
    gz, dscale, dshift = FR.cudnn_conv_dgrad_drelu(dy, w, x, scale, shift, [2, 2], [1, 1], [1, 1], 1)
    assert gz.shape == x.shape and gz.is_contiguous(memory_format=LAYOUTS[layout])
    assert dscale.shape == dshift.shape == (24,) and dscale.dtype == dshift.dtype == torch.float32


def _finalize_reference(x, weight, bias, rm, rv, momentum, eps):
    """(mean, invstd, scale, shift) and the running buffers exactly as nn.BatchNorm2d, in float64."""
    xd = x.double()
    mean, var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    invstd = (var + eps).rsqrt()
    scale = invstd * weight.double()
    rm64, rv64 = rm.double().clone(), rv.double().clone()
    F.batch_norm(xd, rm64, rv64, weight.double(), bias.double(), True, momentum, eps)
    return mean, invstd, scale, bias.double() - mean * scale, rm64, rv64


def _check_finalize(device):
    x = _randn(3, 24, 13, 17, seed=1, scale=2.0).add_(0.7).to(device)
    weight, bias = _randn(24, seed=2).to(device), _randn(24, seed=3).to(device)
    rm, rv = _randn(24, seed=4).to(device), _randn(24, seed=5).abs_().add_(0.5).to(device)
    expected = _finalize_reference(x, weight, bias, rm, rv, 0.3, 1e-5)
    s, q = x.double().sum((0, 2, 3)).float(), x.double().square().sum((0, 2, 3)).float()
    count = x.numel() // x.shape[1]
    got = FR.batch_norm_finalize(s, q, count, weight, bias, rm, rv, 0.3, 1e-5)
    for a, b, what in zip(list(got) + [rm, rv], expected, ("mean", "invstd", "scale", "shift", "running_mean",
                                                           "running_var")):
        assert a.dtype == torch.float32, what
        assert_close(a, b, torch.float32, what)


def test_batch_norm_finalize_matches_batchnorm2d_cpu():
    _check_finalize("cpu")


def test_batch_norm_finalize_opcheck_cpu():
    s, q = _randn(8, seed=1).abs(), _randn(8, seed=2).abs().add_(10)
    torch.library.opcheck(FR.batch_norm_finalize, (s, q, 5, _randn(8, seed=3), _randn(8, seed=4), torch.zeros(8),
                                                    torch.ones(8), 0.1, 1e-5))


def test_graph_implementations_registered_and_not_covering_cpu():
    for op in ("conv2d_act", "bottleneck_tail"):
        impl = dispatch.implementation(op, "cudnn_graph")
        assert impl.backend == "cpp"
        assert impl.rank_for(None) < dispatch.implementation(op, "cpp").rank_for(None)
    x, w = _randn(2, 8, 5, 5), _randn(8, 8, 3, 3)
    call = dispatch.Call("conv2d_act", dict(x=x, weight=w, bias=None, stride=(1, 1), padding=(1, 1),
                                            dilation=(1, 1), groups=1, residual=None, relu=True))
    assert dispatch.coverage(call)["cudnn_graph"].startswith("not covered")


# ------------------------------------------------------------------ GPU

# (N, C, H, W, K, R, stride, padding): ResNet shapes and odd ones.
SHAPES = {
    "resnet3x3": (2, 64, 56, 56, 64, 3, 1, 1),
    "resnet3x3_s2": (2, 128, 28, 28, 128, 3, 2, 1),
    "resnet1x1": (2, 256, 14, 14, 1024, 1, 1, 0),
    "resnet1x1_s2": (2, 512, 28, 28, 1024, 1, 2, 0),
    "stem7x7": (1, 3, 64, 64, 64, 7, 2, 3),
    "odd13x17_b3": (3, 24, 13, 17, 40, 3, 1, 1),
    "odd_c20_b1": (1, 20, 9, 11, 36, 3, 1, 1),
}
# cuDNN must have an engine for these (the shapes ResNet spends its time in), else the graphs are
# worthless: a test that asserts coverage, not one that skips.
MUST_COVER = {"resnet3x3", "resnet3x3_s2", "resnet1x1", "resnet1x1_s2"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def no_tf32():
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _conv_case(name, dtype, layout, seed=0):
    n, c, h, w, k, r, s, p = SHAPES[name]
    x = _randn(n, c, h, w, dtype=dtype, device="cuda", layout=layout, seed=seed)
    wt = _randn(k, c, r, r, dtype=dtype, device="cuda", layout=layout, seed=seed + 1, scale=(c * r * r) ** -0.5)
    oh, ow = (h + 2 * p - r) // s + 1, (w + 2 * p - r) // s + 1
    res = _randn(n, k, oh, ow, dtype=dtype, device="cuda", layout=layout, seed=seed + 2)
    bias = _randn(k, dtype=torch.float32, device="cuda", seed=seed + 3)
    return x, wt, bias, res, [s, s], [p, p]


@gpu
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,residual,relu", [(True, True, True), (True, False, True), (False, False, False)])
def test_conv_bias_act_matches_float64(name, layout, dtype, bias, residual, relu, no_tf32):
    x, w, b, r, stride, padding = _conv_case(name, dtype, layout)
    b, r = (b if bias else None), (r if residual else None)
    args = (x, w, b, r, stride, padding, [1, 1], 1, relu)
    supported = FR.cudnn_conv_bias_act_supported(*args)
    assert FR.cudnn_conv_bias_act_supported(*args) == supported  # the cached verdict is the same one
    if name in MUST_COVER and dtype != torch.float32 and layout == "channels_last":
        assert supported, "cuDNN built no graph for a ResNet shape"
    if not supported:
        with pytest.raises(RuntimeError, match="no engine"):
            FR.cudnn_conv_bias_act(*args)
        return
    y = FR.cudnn_conv_bias_act(*args)
    expected = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding)
    if r is not None:
        expected = expected + r.double()
    if relu:
        expected = torch.relu(expected)
    assert y.dtype == dtype and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(y, expected, dtype, f"{name} {dtype} {layout}")


@gpu
def test_tf32_switch_is_part_of_the_key():
    x, w, b, r, stride, padding = _conv_case("resnet3x3", torch.float32, "channels_last")
    args = (x, w, b, r, stride, padding, [1, 1], 1, True)
    expected = torch.relu(F.conv2d(x.double(), w.double(), b.double(), stride, padding) + r.double())
    old = torch.backends.cudnn.allow_tf32
    try:
        for allow in (False, True):
            torch.backends.cudnn.allow_tf32 = allow
            if FR.cudnn_conv_bias_act_supported(*args):
                # TF32 keeps 10 mantissa bits: float16's tolerance; without it, float32's.
                assert_close(FR.cudnn_conv_bias_act(*args), expected, torch.float16 if allow else torch.float32,
                             f"allow_tf32={allow}")
    finally:
        torch.backends.cudnn.allow_tf32 = old


@gpu
def test_misaligned_views_are_copied_not_misread():
    x, w, b, r, stride, padding = _conv_case("odd13x17_b3", torch.float16, "channels_last")
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    xv = flat[1:].view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
    xv.copy_(x)
    args = (x, w, b, r, stride, padding, [1, 1], 1, True)
    if not FR.cudnn_conv_bias_act_supported(*args):
        pytest.skip("no engine for this shape")
    torch.testing.assert_close(FR.cudnn_conv_bias_act(xv, *args[1:]), FR.cudnn_conv_bias_act(*args), rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bottleneck_tail_two_graphs(layout, dtype, no_tf32):
    h = _randn(2, 128, 14, 14, dtype=dtype, device="cuda", layout=layout, seed=1)
    x = _randn(2, 256, 28, 28, dtype=dtype, device="cuda", layout=layout, seed=2)
    w3 = _randn(512, 128, 1, 1, dtype=dtype, device="cuda", seed=3, scale=128 ** -0.5)
    wd = _randn(512, 256, 1, 1, dtype=dtype, device="cuda", seed=4, scale=256 ** -0.5)
    bias = _randn(512, device="cuda", seed=5)
    expected = torch.relu(F.conv2d(h.double(), w3.double(), bias.double()) + F.conv2d(x.double(), wd.double(),
                                                                                       stride=2))
    if dtype != torch.float32 and layout == "channels_last":
        assert compiled.cudnn_tail_covers(h, w3, x, wd, bias, (2, 2), True)
    if not compiled.cudnn_tail_covers(h, w3, x, wd, bias, (2, 2), True):
        pytest.skip("no engine for one of the two graphs")
    y = compiled.cudnn_bottleneck_tail(h, w3, x, wd, bias, (2, 2), True)
    # The shortcut is rounded to the io dtype between the two graphs: twice the tolerance.
    error = (y.double() - expected).abs().max().item()
    assert error <= 2 * TOLERANCE["op"][dtype] * expected.abs().max().item()
    call = dispatch.Call("bottleneck_tail", dict(h=h, w3=w3, x=x, wd=wd, bias=bias, stride=(2, 2), relu=True))
    with torch.no_grad():
        assert _cpp_choice(call) == "cudnn_graph"
        torch.testing.assert_close(dispatch.implementation("bottleneck_tail", "cudnn_graph").run(call, ""), y,
                                   rtol=0, atol=0)


def _cpp_choice(call):
    """The implementation the explicit "cpp" backend takes for call: its lowest-ranked covering one."""
    coverage = dispatch.coverage(call)
    covering = [i for i in dispatch.implementations(call.op) if i.backend == "cpp" and coverage[i.name] is None]
    return dispatch.static_choice(call, covering).name


@gpu
def test_cpp_backend_prefers_the_graph_where_covered():
    x, w, b, r, stride, padding = _conv_case("resnet3x3", torch.float16, "channels_last")
    args = (x, w, b, r, stride, padding, [1, 1], 1, True)
    assert FR.cudnn_conv_bias_act_supported(*args)
    call = dispatch.Call("conv2d_act", dict(x=x, weight=w, bias=b, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                                            groups=1, residual=r, relu=True))
    with torch.no_grad():
        assert _cpp_choice(call) == "cudnn_graph"
        got = dispatch.implementation("conv2d_act", "cudnn_graph").run(call, "")
    torch.testing.assert_close(got, FR.cudnn_conv_bias_act(*args), rtol=0, atol=0)
    # With autograd on, the graph (no backward formula) must step aside for the epilogue impl.
    wg = w.clone().requires_grad_()
    assert dispatch.coverage(call.replace(weight=wg))["cudnn_graph"].startswith("not covered")


@gpu
@pytest.mark.parametrize("name", ["resnet3x3", "resnet1x1", "odd13x17_b3", "stem7x7"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue", [False, True])
def test_conv_genstats_matches_float64(name, layout, dtype, prologue, no_tf32):
    x, w, _, _, stride, padding = _conv_case(name, dtype, layout)
    c = x.shape[1]
    scale = _randn(c, device="cuda", seed=7).abs_().add_(0.5) if prologue else None
    shift = _randn(c, device="cuda", seed=8) if prologue else None
    args = (x, w, scale, shift, prologue, stride, padding, [1, 1], 1)
    if not FR.cudnn_conv_genstats_supported(*args):
        if name in ("resnet3x3", "resnet1x1") and dtype == torch.float16 and layout == "channels_last":
            pytest.fail("cuDNN built no genstats graph for a ResNet shape in float16 channels_last")
        pytest.skip("no engine (the training path falls back per layer)")
    y, s, q = FR.cudnn_conv_genstats(*args)
    xin = x.double()
    if prologue:
        xin = torch.relu(xin * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    expected = F.conv2d(xin, w.double(), None, stride, padding)
    assert y.dtype == dtype and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(y, expected, dtype, "y")
    # The sums are of y as computed in fp32 (before rounding): compare with the io dtype's tolerance.
    assert_close(s, expected.sum((0, 2, 3)), dtype, "sum")
    assert_close(q, expected.square().sum((0, 2, 3)), dtype, "sum of squares")


def _prologue_case(name, dtype, layout, relu=True):
    """x, w, dy, scale, shift, stride, padding of a NormConv backward at SHAPES[name]."""
    x, w, _, res, stride, padding = _conv_case(name, dtype, layout)
    c = x.shape[1]
    scale = _randn(c, device="cuda", seed=7).abs_().add_(0.5)
    shift = _randn(c, device="cuda", seed=8)
    dy = _randn(*res.shape, dtype=dtype, device="cuda", layout=layout, seed=9)
    return x, w, dy, scale, shift, stride, padding


def _pre_activation64(x, scale, shift):
    return x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)


@gpu
@pytest.mark.parametrize("name", ["resnet3x3", "resnet3x3_s2", "resnet1x1", "odd13x17_b3", "odd_c20_b1"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue", ["none", "affine", "relu"])
def test_conv_wgrad_matches_float64(name, layout, dtype, prologue, no_tf32):
    x, w, dy, scale, shift, stride, padding = _prologue_case(name, dtype, layout)
    if prologue == "none":
        scale = shift = None
    args = (dy, x, list(w.shape), scale, shift, prologue == "relu", stride, padding, [1, 1], 1)
    if not FR.cudnn_conv_wgrad_supported(*args):
        pytest.skip("no engine (the backward falls back to torch's wgrad for this layer)")
    dw = FR.cudnn_conv_wgrad(*args)
    a = x.double() if scale is None else _pre_activation64(x, scale, shift)
    if prologue == "relu":
        a = torch.relu(a)
    expected = torch.ops.aten.convolution_backward(dy.double(), a, w.double(), None, stride, padding, [1, 1], False,
                                                   [0, 0], 1, [False, True, False])[1]
    assert dw.shape == w.shape and dw.dtype == dtype
    assert_close(dw, expected, dtype, "dw")


@gpu
@pytest.mark.parametrize("name", ["resnet3x3", "resnet3x3_s2", "resnet1x1", "odd13x17_b3", "odd_c20_b1"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_dgrad_drelu_matches_float64(name, layout, dtype, no_tf32):
    x, w, dy, scale, shift, stride, padding = _prologue_case(name, dtype, layout)
    args = (dy, w, x, scale, shift, stride, padding, [1, 1], 1)
    if not FR.cudnn_conv_dgrad_drelu_supported(*args):
        if name in ("resnet3x3", "resnet1x1") and dtype == torch.float16 and layout == "channels_last":
            pytest.fail("cuDNN built no dgrad + dReLU + dBN-weight graph for a ResNet shape in float16 "
                        "channels_last (cuDNN >= 9.8 has the pattern on Ampere and Hopper)")
        pytest.skip("no engine (the backward falls back to torch for this layer)")
    gz, dscale, dshift = FR.cudnn_conv_dgrad_drelu(*args)
    pre = _pre_activation64(x, scale, shift)
    da = torch.ops.aten.convolution_backward(dy.double(), torch.relu(pre), w.double(), None, stride, padding,
                                             [1, 1], False, [0, 0], 1, [True, False, False])[0]
    expected = torch.where(pre > 0, da, 0.0)
    assert gz.dtype == dtype and gz.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(gz, expected, dtype, "gz")
    assert_close(dscale, (expected * x.double()).sum((0, 2, 3)), dtype, "sum(gz * x)")
    assert_close(dshift, expected.sum((0, 2, 3)), dtype, "sum(gz)")


@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cudnn_norm_conv_gradients_match_float64(layout, dtype, no_tf32):
    """The whole cuDNN NormConv op (forward genstats graph, backward wgrad + dgrad/dReLU graphs)
    against the float64 reference, every input's gradient, through the (mean, var) outputs too."""
    from fastres.ops import registry

    x, w, dy, scale, shift, stride, padding = _prologue_case("resnet3x3", dtype, layout)
    if not FR.cudnn_conv_genstats_supported(x, w, scale, shift, True, stride, padding, [1, 1], 1):
        pytest.fail("no genstats graph for the ResNet 3x3")
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, scale, shift)]
    y, mean, var = registry.CUDNN_NORM_CONV(*leaves, True, stride, padding, [1, 1], 1)
    gm, gv = _randn(*mean.shape, device="cuda", seed=11), _randn(*var.shape, device="cuda", seed=12)
    torch.autograd.backward([y, mean, var], [dy, gm, gv])
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, scale, shift)]
    y64, mean64, var64 = reference.norm_conv_stats(*leaves64[:2], leaves64[2], leaves64[3], True, stride, padding,
                                                   [1, 1], 1)
    torch.autograd.backward([y64, mean64, var64], [dy.double(), gm.double(), gv.double()])
    for got, want, what in zip(leaves, leaves64, ("x", "weight", "scale", "shift")):
        assert_close(got.grad, want.grad, dtype, f"d{what}")


@gpu
def test_batch_norm_finalize_matches_batchnorm2d_cuda():
    _check_finalize("cuda")


@gpu
def test_genstats_then_finalize_is_batchnorm_training():
    """conv -> genstats -> finalize gives nn.BatchNorm2d's normalisation and running buffers."""
    x, w, _, _, stride, padding = _conv_case("resnet3x3", torch.float16, "channels_last")
    args = (x, w, None, None, False, stride, padding, [1, 1], 1)
    if not FR.cudnn_conv_genstats_supported(*args):
        pytest.fail("no genstats graph for the ResNet 3x3 in float16 channels_last")
    y, s, q = FR.cudnn_conv_genstats(*args)
    k = y.shape[1]
    weight, bias = _randn(k, device="cuda", seed=1), _randn(k, device="cuda", seed=2)
    rm, rv = torch.zeros(k, device="cuda"), torch.ones(k, device="cuda")
    mean, invstd, scale, shift = FR.batch_norm_finalize(s, q, y.numel() // k, weight, bias, rm, rv, 0.1, 1e-5)
    rm64, rv64 = torch.zeros(k, dtype=torch.float64, device="cuda"), torch.ones(k, dtype=torch.float64, device="cuda")
    ref = F.batch_norm(y.double(), rm64, rv64, weight.double(), bias.double(), True, 0.1, 1e-5)
    assert_close(y.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1), ref,
                 torch.float16, "normalised")
    assert_close(rm, rm64, torch.float16, "running_mean")
    assert_close(rv, rv64, torch.float16, "running_var")


@gpu
def test_graph_capture_and_no_host_sync():
    x, w, b, r, stride, padding = _conv_case("resnet3x3", torch.float16, "channels_last")
    args = (x, w, b, r, stride, padding, [1, 1], 1, True)
    assert FR.cudnn_conv_bias_act_supported(*args)  # builds the plan outside capture
    expected = FR.cudnn_conv_bias_act(*args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        FR.cudnn_conv_bias_act(*args)  # a cached plan runs without synchronising the host
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        FR.cudnn_conv_bias_act(*args)  # another stream: the handle follows torch's current stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = FR.cudnn_conv_bias_act(*args)
    x.mul_(-1)  # replay reads the new contents
    graph.replay()
    x.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
