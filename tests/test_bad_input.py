"""Bad input to the models and the less common bad op calls: a ValueError/TypeError that names
the argument and what was expected (never a crash, a hang or a wrong number); an empty batch
gives an empty result exactly like torchvision."""
from __future__ import annotations

import re

import pytest
import torch

import fastres
from fastres import ops

from helpers import assert_rel_close, build_pair, randn

BACKENDS = fastres.available_backends()
# One model of each family (their forwards are separate code).
FAMILIES = {"resnet18": dict(num_classes=10), "resnet50": dict(num_classes=10),
            "resnet_v2_18": dict(num_classes=10), "cifar_resnet20": {}}


def _model(name):
    torch.manual_seed(0)
    return getattr(fastres, name)(**FAMILIES[name]).eval()


BAD_MODEL_INPUTS = [
    ("not a tensor", TypeError, "the model input must be a torch.Tensor; got list", lambda m: [[1.0]]),
    ("3-D", ValueError, r"must be 4-D \(N, C, H, W\); got shape \(3, 32, 32\)", lambda m: randn(3, 32, 32)),
    ("5-D", ValueError, "must be 4-D", lambda m: randn(1, 1, 3, 32, 32)),
    ("channels", ValueError, "has 4 channels but the model's first conv expects 3", lambda m: randn(2, 4, 32, 32)),
    ("integer", TypeError, "must have a floating dtype; got torch.int64",
     lambda m: torch.ones(2, 3, 32, 32, dtype=torch.int64)),
    ("dtype mismatch", TypeError, "has dtype torch.float64 but the model's parameters have torch.float32",
     lambda m: randn(2, 3, 32, 32, dtype=torch.float64)),
    ("device mismatch", ValueError, "is on meta but the model's parameters are on cpu",
     lambda m: torch.empty(2, 3, 32, 32, device="meta")),
]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", BAD_MODEL_INPUTS, ids=[c[0] for c in BAD_MODEL_INPUTS])
@pytest.mark.parametrize("training", [False, True])
def test_model_rejects_bad_input(case, name, training):
    _, error, message, make = case
    model = _model(name).train(training)
    with pytest.raises(error, match=message):
        model(make(model))


@pytest.mark.parametrize("name", FAMILIES)
def test_training_batch_norm_with_one_value_per_channel(name):
    """torchvision's message, from fastres's own check: batch 1 reaching a 1x1 feature map."""
    model = _model(name).train()
    with pytest.raises(ValueError, match="one value per channel; training BatchNorm needs more than one"):
        model(randn(1, 3, 2, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_empty_batch_like_torchvision(name, backend):
    """N=0 in eval and in training: an empty (0, classes) output and torchvision's buffers after it
    (num_batches_tracked counts the empty batch, running statistics unchanged)."""
    tv, fr = build_pair(name, num_classes=10)
    x = randn(0, 3, 32, 32)
    for training in (False, True):
        tv.train(training), fr.train(training)
        with fastres.use_backend(backend):
            y = fr(x)
        y_tv = tv(x)
        assert y.shape == y_tv.shape == (0, 10) and y.dtype == y_tv.dtype
        y.sum().backward()  # the graph of an empty batch is still valid
        for (key, b), b_tv in zip(fr.state_dict().items(), tv.state_dict().values()):
            assert torch.equal(b, b_tv), f"{key} differs after an empty {'training' if training else 'eval'} batch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_ops(backend):
    x, res = randn(0, 8, 5, 5), randn(0, 4, 5, 5)
    w = randn(4, 8, 3, 3)
    mean, var = torch.zeros(8), torch.ones(8)
    with fastres.use_backend(backend):
        assert ops.conv2d_act(x, w, None, 1, 1, residual=res).shape == (0, 4, 5, 5)
        assert ops.add_relu(res, res).shape == (0, 4, 5, 5)
        assert ops.bottleneck_tail(randn(0, 4, 3, 3), randn(6, 4, 1, 1), x, randn(6, 8, 1, 1), stride=2).shape \
            == (0, 6, 3, 3)
        for training in (True, False):
            y = ops.batch_norm_act(x, None, None, mean, var, training=training)
            assert y.shape == x.shape
        assert torch.equal(mean, torch.zeros(8)) and torch.equal(var, torch.ones(8)), "an empty batch moved the stats"


META = torch.device("meta")
BAD_OP_CALLS = [
    ("weight is on meta but x is on cpu", ValueError,
     lambda: ops.conv2d_act(randn(1, 8, 5, 5), torch.empty(4, 8, 1, 1, device=META))),
    ("residual is on meta but x is on cpu", ValueError,
     lambda: ops.add_relu(randn(1, 4, 5, 5), torch.empty(1, 4, 5, 5, device=META))),
    ("bias is on meta but x is on cpu", ValueError,
     lambda: ops.conv2d_act(randn(1, 8, 5, 5), randn(4, 8, 1, 1), torch.empty(4, device=META))),
    ("running_mean is on meta but x is on cpu", ValueError,
     lambda: ops.batch_norm_act(randn(2, 4, 3, 3), None, None, torch.empty(4, device=META), torch.ones(4),
                                training=False)),
    ("weight must have a floating dtype", TypeError,
     lambda: ops.conv2d_act(randn(1, 8, 5, 5), torch.ones(4, 8, 1, 1, dtype=torch.int32))),
    ("weight has dtype torch.bfloat16 but x has torch.float32", TypeError,
     lambda: ops.conv2d_act(randn(1, 8, 5, 5), randn(4, 8, 1, 1).bfloat16())),
    ("weight must be 4-D", ValueError, lambda: ops.conv2d_act(randn(1, 8, 5, 5), randn(4, 8))),
    ("stride must be an int or a pair of ints; got a bool", TypeError,
     lambda: ops.conv2d_act(randn(1, 8, 5, 5), randn(4, 8, 1, 1), stride=True)),
    ("padding must be an int or a pair of ints", TypeError,
     lambda: ops.conv2d_act(randn(1, 8, 5, 5), randn(4, 8, 1, 1), padding=(1, 1, 1))),
    ("stride must be >= 1", ValueError,
     lambda: ops.bottleneck_tail(randn(1, 4, 3, 3), randn(8, 4, 1, 1), randn(1, 6, 5, 5), randn(8, 6, 1, 1),
                                 stride=-2)),
    ("weight's 6 output channels are not divisible by groups=4", ValueError,
     lambda: ops.conv2d_act(randn(1, 8, 5, 5), randn(6, 2, 1, 1), groups=4)),
    ("eps must be a non-negative number", ValueError,
     lambda: ops.batch_norm_act(randn(2, 4, 3, 3), None, None, None, None, training=True, eps=-1.0)),
    ("training must be a bool", TypeError,
     lambda: ops.batch_norm_act(randn(2, 4, 3, 3), None, None, None, None, training="yes")),
    ("x must be a torch.Tensor; got ndarray", TypeError,
     lambda: ops.add_relu(randn(2, 3).numpy(), randn(2, 3))),
    ("h has 5 channels but w3 expects 4", ValueError,
     lambda: ops.bottleneck_tail(randn(1, 5, 3, 3), randn(8, 4, 1, 1), randn(1, 6, 5, 5), randn(8, 6, 1, 1),
                                 stride=2)),
    ("w3 and wd must have the same output channels", ValueError,
     lambda: ops.bottleneck_tail(randn(1, 4, 3, 3), randn(8, 4, 1, 1), randn(1, 6, 5, 5), randn(9, 6, 1, 1),
                                 stride=2)),
    ("conv_weight must be at least 2-D", ValueError,
     lambda: ops.fold_bn(randn(4), None, None, None, torch.zeros(4), torch.ones(4))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("message,error,call", BAD_OP_CALLS, ids=[c[0] for c in BAD_OP_CALLS])
def test_op_rejects_bad_input_on_every_backend(message, error, call, backend):
    with fastres.use_backend(backend), pytest.raises(error, match=re.escape(message)):
        call()


def test_model_input_errors_leave_the_model_usable():
    """A rejected call must not leave half-updated state behind (running stats, counters, caches)."""
    tv, fr = build_pair("resnet18", num_classes=10)
    before = {k: v.clone() for k, v in fr.state_dict().items()}
    fr.train()
    with pytest.raises(ValueError):
        fr(randn(2, 4, 32, 32))
    for key, value in fr.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a rejected call"
    tv.eval(), fr.eval()
    x = randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_rel_close(fr(x), tv(x), what="after a rejected call")
