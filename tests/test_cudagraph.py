"""fastres.cudagraph: CUDA-graph replay of an eval forward, and no host synchronisation in a forward.

Without a GPU only the argument checks run (they come before anything touches CUDA). With one:
for every backend, resnet18 and resnet50 (BN statistics randomized), batch 1 and 3,
channels_last fp32 and bf16 inputs, the graphed output equals the eager one (the same kernels
on the same folded weights: fp32 within 1e-5, bf16 within 2e-2 of max|eager|), every call
computes its own input, kept outputs survive later calls, and a weight change (load_state_dict,
an SGD step) is followed by a re-capture, never by stale numbers. Each weight change is checked
to move the output far beyond the tolerance, so a stale graph cannot pass by accident.
"""
from __future__ import annotations

import pytest
import torch

import fastres
from helpers import TOLERANCE, assert_exactly_equal, assert_rel_close, randn, randomize_bn_, rel_error
from fastres import GraphedInference, cudagraph

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
BACKENDS = fastres.available_backends()
MODELS = ["resnet18", "resnet50"]
IMAGE = (3, 64, 64)
CHANGED = 1e-2   # a weight change must move the output by more than this (relative to max|output|)


def _model(name: str = "resnet18", dtype=torch.float32, seed: int = 0, device: str = "cuda"):
    torch.manual_seed(seed)
    model = getattr(fastres, name)(num_classes=10)
    randomize_bn_(model, seed + 1)
    return model.to(device=device, dtype=dtype).eval()


def _input(batch: int, dtype=torch.float32, seed: int = 0, device: str = "cuda") -> torch.Tensor:
    return randn(batch, *IMAGE, seed=seed, dtype=dtype, channels_last=True).to(device)


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def _no_host_sync(fn):
    """fn() with CUDA's sync debug mode on "error": any host synchronisation raises."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# =============================================================================================
# 1. argument checks (run without a GPU)
# =============================================================================================

def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got function"):
        cudagraph(lambda x: x, torch.zeros(1, 3, 8, 8))


def test_example_must_be_a_tensor():
    model = _model(device="cpu")
    with pytest.raises(TypeError, match="example must be a torch.Tensor.*got list"):
        cudagraph(model, [[1.0, 2.0]])


def test_model_must_be_in_eval_mode():
    model = _model(device="cpu").train()
    with pytest.raises(ValueError, match=r"model is in training mode.*call model\.eval\(\)"):
        cudagraph(model, torch.zeros(1, *IMAGE))
    model.eval()
    model.layer1[0].bn1.train()  # one submodule left training is named
    with pytest.raises(ValueError, match=r"model\.layer1\.0\.bn1 is in training mode.*call model\.eval\(\)"):
        cudagraph(model, torch.zeros(1, *IMAGE))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_example_must_be_on_a_cuda_device(device):
    model = _model(device="cpu")
    with pytest.raises(ValueError, match=f"example is on {device}; CUDA graphs need a CUDA tensor"):
        cudagraph(model, torch.zeros(1, *IMAGE, device=device))


@pytest.mark.parametrize("kwargs,error,message", [
    ({"warmup": 0}, ValueError, "warmup must be an int >= 1; got 0"),
    ({"warmup": True}, ValueError, "warmup must be an int >= 1; got True"),
    ({"warmup": 2.0}, ValueError, "warmup must be an int >= 1; got 2.0"),
    ({"copy_output": "yes"}, TypeError, "copy_output must be a bool; got str"),
    ({"check_weights": 1}, TypeError, "check_weights must be a bool; got int"),
])
def test_bad_options(kwargs, error, message):
    model = _model(device="cpu")
    with pytest.raises(error, match=message):
        cudagraph(model, torch.zeros(1, *IMAGE), **kwargs)


# =============================================================================================
# 2. graphed == eager (GPU)
# =============================================================================================

@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_graphed_matches_eager(backend, name, batch, dtype):
    model = _model(name, dtype)
    xs = [_input(batch, dtype, seed=s) for s in range(3)]
    with fastres.use_backend(backend):
        graphed = cudagraph(model, xs[0])
        assert isinstance(graphed, GraphedInference) and graphed.captures == 1
        outs = [graphed(x) for x in xs]          # all before any check: later calls must not touch earlier outputs
        expected = [_eager(model, x) for x in xs]
        assert graphed(xs[1]) is not outs[1]     # copy_output=True: a fresh tensor each call
    what = f"{name} batch {batch} {dtype} [{backend}]"
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert_rel_close(out, exp, TOLERANCE["graph"][dtype], f"{what} call {i}")
        assert not out.requires_grad
    for i in (1, 2):  # each call computed its own input, not the captured example's
        assert rel_error(outs[i], outs[0]) > CHANGED, f"{what}: call {i} returned call 0's result"
    # The eager forwards in between changed nothing the check watches: no spurious re-capture.
    assert graphed.captures == 1, f"{what}: {graphed.captures} captures"
    assert graphed.example_shape == xs[0].shape


@GPU
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_inputs_are_rejected(backend):
    model = _model()
    x = _input(2)
    with fastres.use_backend(backend):
        graphed = cudagraph(model, x)
        for bad in (_input(3), _input(2)[:, :, :32], _input(2, torch.bfloat16), _input(2, device="cpu")):
            with pytest.raises(ValueError, match=r"captured for shape \(2, 3, 64, 64\), dtype torch.float32"):
                graphed(bad)
        with pytest.raises(TypeError, match="input must be a torch.Tensor"):
            graphed(x.tolist())
        # Another memory format of the right shape is fine: it is copied into the static input.
        assert_exactly_equal(graphed(x.contiguous()), graphed(x), "NCHW input into a channels_last graph")
    assert graphed.captures == 1
    assert "(2, 3, 64, 64)" in repr(graphed) and "torch.float32" in repr(graphed)
    assert "channels_last" in repr(graphed)


@GPU
def test_parameters_must_be_on_the_example_device():
    model = _model(device="cpu")
    with pytest.raises(ValueError, match="model's conv1.weight is on cpu but example is on cuda"):
        cudagraph(model, _input(1))


@GPU
def test_copy_output_false_returns_the_static_output():
    model = _model()
    x1, x2 = _input(2, seed=1), _input(2, seed=2)
    graphed = cudagraph(model, x1, copy_output=False)
    out1 = graphed(x1)
    out2 = graphed(x2)
    assert out1 is out2, "copy_output=False returns the one static output, overwritten by each call"
    assert_rel_close(out2, _eager(model, x2), TOLERANCE["graph"][torch.float32], "static output")


@GPU
def test_calls_on_another_stream():
    model = _model()
    x1, x2 = _input(2, seed=1), _input(2, seed=2)
    graphed = cudagraph(model, x1)
    out1 = graphed(x1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out2 = graphed(x2)
    torch.cuda.current_stream().wait_stream(side)
    assert_rel_close(out1, _eager(model, x1), TOLERANCE["graph"][torch.float32], "call 1")
    assert_rel_close(out2, _eager(model, x2), TOLERANCE["graph"][torch.float32], "call 2 on a side stream")


# =============================================================================================
# 3. weight changes: re-capture, never stale numbers (GPU)
# =============================================================================================

@GPU
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_follows_new_weights(backend, name):
    model = _model(name)
    other = _model(name, seed=5)
    x = _input(2)
    rtol = TOLERANCE["graph"][torch.float32]
    with fastres.use_backend(backend):
        graphed = cudagraph(model, x)
        before = graphed(x)

        model.load_state_dict(other.state_dict())
        after_load = graphed(x)
        assert graphed.captures == 2, "load_state_dict did not trigger a re-capture"
        assert_rel_close(after_load, _eager(model, x), rtol, f"{name} after load_state_dict [{backend}]")
        assert_rel_close(after_load, _eager(other, x), rtol, f"{name} after load_state_dict vs other [{backend}]")
        assert rel_error(after_load, before) > CHANGED

        g = torch.Generator(device="cuda").manual_seed(3)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 0.1
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        after_step = graphed(x)
        assert graphed.captures == 3, "an optimizer step did not trigger a re-capture"
        assert_rel_close(after_step, _eager(model, x), rtol, f"{name} after an SGD step [{backend}]")
        assert rel_error(after_step, after_load) > CHANGED

        graphed(x)
        assert graphed.captures == 3, "no change, yet a re-capture"


@GPU
def test_without_weight_check_recapture_is_explicit():
    model = _model()
    x = _input(2)
    graphed = cudagraph(model, x, check_weights=False)
    graphed(x)
    model.load_state_dict(_model(seed=5).state_dict())
    # Documented: without the check the graph keeps its folded weights (the fc layer, read
    # directly, follows): wrong numbers until recapture().
    assert rel_error(graphed(x), _eager(model, x)) > CHANGED
    assert graphed.captures == 1
    graphed.recapture()
    assert graphed.captures == 2
    assert_rel_close(graphed(x), _eager(model, x), TOLERANCE["graph"][torch.float32], "after recapture()")
    # A backend switch changes what runs: seen even without the weight check.
    other = next(b for b in BACKENDS if b != fastres.get_backend())
    with fastres.use_backend(other):
        assert_rel_close(graphed(x), _eager(model, x), TOLERANCE["graph"][torch.float32], f"on backend {other}")
    assert graphed.captures == 3


@GPU
def test_recapture_after_data_edit():
    """`.data` edits are invisible to version counters: recapture() re-folds and re-captures."""
    model = _model()
    x = _input(2)
    graphed = cudagraph(model, x)
    before = graphed(x)
    with torch.no_grad():
        model.layer1[0].bn1.weight.data.mul_(3.0)
    graphed.recapture()
    after = graphed(x)
    assert rel_error(after, before) > CHANGED
    assert_rel_close(after, _eager(model, x), TOLERANCE["graph"][torch.float32], "after .data edit + recapture()")
    model_ref = _model(device="cpu")  # the same weights, edited the same way, never cached
    with torch.no_grad():
        model_ref.layer1[0].bn1.weight.mul_(3.0)
    with fastres.use_backend("torch"):
        assert_rel_close(after.cpu(), _eager(model_ref, x.cpu()), 1e-4, "against a fresh CPU model")


@GPU
def test_recapture_from_inference_mode_and_train_mode_error():
    model = _model()
    x = _input(2)
    graphed = cudagraph(model, x)
    model.load_state_dict(_model(seed=5).state_dict())
    with torch.inference_mode():  # the re-capture leaves inference mode (the fold cache needs version counters)
        out = graphed(x)
    assert graphed.captures == 2
    assert_rel_close(out, _eager(model, x), TOLERANCE["graph"][torch.float32], "re-captured under inference_mode")
    model.train()
    with pytest.raises(ValueError, match=r"call model\.eval\(\)"):
        graphed(x)
    model.eval()
    assert_rel_close(graphed(x), _eager(model, x), TOLERANCE["graph"][torch.float32], "back in eval mode")


# =============================================================================================
# 4. no host synchronisation in a forward (GPU)
# =============================================================================================

@GPU
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_in_forward(backend, name):
    model = _model(name)
    x = _input(2)
    w = torch.randn(2, 10, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))

    def train_step():
        model.zero_grad(set_to_none=True)
        (model(x) * w).sum().backward()

    with fastres.use_backend(backend):
        _eager(model, x)  # warm-up outside: first calls compile kernels and fill the fold cache
        _no_host_sync(lambda: _eager(model, x))
        graphed = cudagraph(model, x)
        graphed(x)
        _no_host_sync(lambda: graphed(x))
        model.train()
        train_step()
        _no_host_sync(train_step)
        model.eval()
    torch.cuda.synchronize()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
