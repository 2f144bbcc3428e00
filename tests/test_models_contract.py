"""torchvision's per-model contract (its test_models.py) for every fastres constructor: the same output
as torchvision for the same seed, torch.jit.script with a save/load round trip, torch.jit.trace,
torch.fx, backprop to the input, and dilation checked on sliced models.

CPU-sized on purpose: 1x3x32x32 inputs and num_classes=10; the big models are marked slow (helpers.BIG).
"""
from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import fastres
from fastres.models.tracing import fused_block
from helpers import (BIG, CONSTRUCTORS, TOLERANCE, assert_as_accurate, assert_rel_close, assert_state_dicts_equal,
                     build_pair, randn)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")

SCRIPT_RTOL, ROUND_TRIP_RTOL = 1e-4, 3e-4   # torchvision's tolerances for scripted and reloaded models
SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module",
                params=[pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in CONSTRUCTORS])
def pair(request):
    """(name, torchvision model, fastres model), both from seed 0, in eval mode (BN at its initial state,
    as torchvision's test compares)."""
    tv, fr = build_pair(request.param, seed=0, randomize=False, num_classes=10)
    return request.param, tv.eval(), fr.eval()


def test_same_output_as_torchvision_for_the_same_seed(pair):
    name, tv, fr = pair
    assert_state_dicts_equal(fr.state_dict(), tv.state_dict(), f"{name} from seed 0")
    x = randn(*SHAPE, seed=1)
    with torch.no_grad():
        assert_rel_close(fr(x), tv(x), what=f"{name} seed 0")


def test_script_and_save_load(pair):
    name, tv, fr = pair
    scripted = torch.jit.script(copy.deepcopy(fr))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = randn(*SHAPE, seed=2)
    with torch.no_grad():
        eager = fr(x)
        assert_rel_close(scripted(x), eager, SCRIPT_RTOL, f"scripted {name}")
        assert_rel_close(loaded(x), eager, ROUND_TRIP_RTOL, f"loaded {name}")
        assert_rel_close(loaded(x), tv(x), ROUND_TRIP_RTOL, f"loaded {name} vs torchvision")


def test_trace(pair):
    name, _, fr = pair
    x, other = randn(*SHAPE, seed=3), randn(*SHAPE, seed=4)
    traced = torch.jit.trace(copy.deepcopy(fr), x)
    with torch.no_grad():
        for inp in (x, other):
            assert_rel_close(traced(inp), fr(inp), SCRIPT_RTOL, f"traced {name}")


def test_fx(pair):
    name, _, fr = pair
    gm = torch.fx.symbolic_trace(fr)
    blocks = [m for m in fr.modules() if isinstance(m, (fastres.BasicBlock, fastres.Bottleneck))]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(fused_block) == len(blocks)
    x = randn(*SHAPE, seed=5)
    with torch.no_grad():
        assert_rel_close(gm(x), fr(x), 1e-5, f"fx {name}")


def test_input_backprop(pair):
    """The input gradient exists and is as accurate as torchvision's against float64 (measured: torchvision
    fp32's own is 7e-3 from float64 on wide_resnet101_2 at this input, fastres's 1e-6)."""
    name, tv, fr = pair
    grads = []
    for model, dtype in ((tv, torch.float32), (fr, torch.float32), (copy.deepcopy(tv).double(), torch.float64)):
        x = randn(*SHAPE, seed=6, dtype=dtype).requires_grad_(True)
        model(x).sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        grads.append(x.grad)
    assert_as_accurate(grads[1], grads[0], grads[2], rtol=TOLERANCE["grad"][torch.float32],
                       what=f"{name} input gradient")


def _sliced(model, stop_layer="layer4"):
    """torchvision's _make_sliced_model: the children up to and including stop_layer, as a Sequential."""
    layers = OrderedDict()
    for name, child in model.named_children():
        layers[name] = child
        if name == stop_layer:
            break
    return nn.Sequential(layers)


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("dilation", [[False, False, False], [False, False, True], [False, True, True]])
def test_dilation_sliced(name, dilation):
    """replace_stride_with_dilation on a model sliced at layer4 (as torchvision's test): the feature map is
    2 ** (dilated stages) times larger, and the features are torchvision's."""
    tv, fr = build_pair(name, seed=0, num_classes=10, replace_stride_with_dilation=dilation)
    tv, fr = _sliced(tv).eval(), _sliced(fr).eval()
    x = randn(1, 3, 64, 64, seed=7)
    with torch.no_grad():
        out = fr(x)
        f = 2 ** sum(dilation)
        assert out.shape == (1, 2048, 2 * f, 2 * f)
        assert_rel_close(out, tv(x), what=f"sliced {name} dilation={dilation}")


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_basic_block_dilation_is_refused_like_torchvision(name):
    with pytest.raises(NotImplementedError):
        getattr(tvm, name)(replace_stride_with_dilation=[False, False, True])
    with pytest.raises(NotImplementedError, match="Dilation > 1 not supported in BasicBlock"):
        getattr(fastres, name)(replace_stride_with_dilation=[False, False, True])
