"""fastres models under torch.fx (symbolic_trace, torchvision's feature extraction) and TorchScript
(script with save/load, trace), in train and eval mode, against the eager model.

FX keeps the fused ops as graph nodes (one `fused_block` per block, the fused stem) that run the
eager fused code when the graph runs, so FX results are the eager ones; TorchScript runs the plain
module path (torchvision's arithmetic): eval within torchvision's tolerances of the eager fused
(BN-folded) model, 1e-4, and 3e-4 after a save/load round trip.
CPU-sized on purpose: one model of each family at 2x3x32x32 (every comparison is of two runs of the
same arithmetic, so BatchNorm's conditioning at layer4's 1x1 does not matter here).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torchvision.models import feature_extraction as tv_fe
from torchvision.models import resnet as tv_resnet

import fastres
from fastres.models.preact import PreActBasicBlock, PreActBottleneck
from fastres.models.tracing import fused_block

from helpers import assert_exactly_equal, assert_rel_close, randn, randomize_bn_

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")

FAMILIES = {"resnet18": dict(num_classes=10), "resnet50": dict(num_classes=10),
            "resnet_v2_18": dict(num_classes=10), "cifar_resnet20": {}}
BLOCKS = (fastres.BasicBlock, fastres.Bottleneck, PreActBasicBlock, PreActBottleneck)
SCRIPT_RTOL, ROUND_TRIP_RTOL = 1e-4, 3e-4   # torchvision's test_models.py tolerances
MODES = ["train", "eval"]
SHAPE = (2, 3, 32, 32)


def _model(name, mode):
    torch.manual_seed(0)
    return randomize_bn_(getattr(fastres, name)(**FAMILIES[name])).train(mode == "train")


def _last_layer(name):
    return "layer3" if name.startswith("cifar") else "layer4"


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, BLOCKS)]


def _step(model, x, run=None):
    """Forward (through `run` if given) + backward of a fixed random linear loss:
    (output, input grad, {param: grad}, {buffer: value})."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = (model if run is None else run)(x)
    g = torch.Generator().manual_seed(5)
    (torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype) * y).sum().backward()
    return (y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


def _compare_steps(actual, expected, rtol, what):
    y_a, gx_a, grads_a, bufs_a = actual
    y_e, gx_e, grads_e, bufs_e = expected
    assert_rel_close(y_a, y_e, rtol, f"{what} output")
    assert_rel_close(gx_a, gx_e, rtol, f"{what} input grad")
    assert list(grads_a) == list(grads_e)
    for key in grads_e:
        assert_rel_close(grads_a[key], grads_e[key], rtol, f"{what} grad {key}")
    assert list(bufs_a) == list(bufs_e)
    for key in bufs_e:
        if bufs_e[key].is_floating_point():
            assert_rel_close(bufs_a[key], bufs_e[key], rtol, f"{what} buffer {key}")
        else:
            assert_exactly_equal(bufs_a[key], bufs_e[key], f"{what} buffer {key}")


# ---------------------------------------------------------------------------------------------- torch.fx

def _fused_graph(gm, model, name):
    """The graph keeps the fused ops: one fused_block node per block, and no BatchNorm runs as a module."""
    functions = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert functions.count(fused_block) == len(_blocks(model)), f"{name}: {functions}"
    modules = dict(gm.named_modules())
    batch_norms = [n.target for n in gm.graph.nodes
                   if n.op == "call_module" and isinstance(modules[n.target], nn.modules.batchnorm._BatchNorm)]
    assert not batch_norms, f"{name}: BatchNorm modules in the graph: {batch_norms}"


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_symbolic_trace_matches_eager(name, mode):
    """Eval: the eager output. Training: output, every gradient and buffer after one step. Then the
    same graph in the other mode (its nodes read the block's mode when they run)."""
    model = _model(name, mode)
    twin = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model)
    _fused_graph(gm, model, name)
    x = randn(*SHAPE, seed=1)
    _compare_steps(_step(model, x, gm), _step(twin, x), 1e-5, f"fx {name} {mode}")
    other = "eval" if mode == "train" else "train"
    gm.train(other == "train")
    twin.train(other == "train")
    assert all(m.training == (other == "train") for m in _blocks(model))   # the graph holds the model's blocks
    with torch.no_grad():
        assert_rel_close(gm(x), twin(x), 1e-5, f"fx {name} traced in {mode}, run in {other}")
    for (key, buf), (_, twin_buf) in zip(model.named_buffers(), twin.named_buffers()):
        assert_rel_close(buf.double(), twin_buf.double(), 1e-5, f"fx {name} run in {other}: buffer {key}")


@pytest.mark.parametrize("name", ["resnet18", "cifar_resnet20"])
def test_symbolic_trace_checks_the_real_input(name):
    """The input checks are a graph node: the traced model rejects bad input with the eager messages."""
    gm = torch.fx.symbolic_trace(_model(name, "eval"))
    with pytest.raises(ValueError, match="has 4 channels but the model's first conv expects 3"):
        gm(randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="must be 4-D"):
        gm(randn(3, 32, 32))


def test_traced_graph_saves_loads_and_deepcopies(tmp_path):
    """A GraphModule of a fastres model pickles (its leaf targets are importable functions) and deep-copies."""
    model = _model("resnet50", "eval")
    gm = torch.fx.symbolic_trace(model)
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    x = randn(*SHAPE, seed=12)
    with torch.no_grad():
        expected = model(x)
        assert_rel_close(loaded(x), expected, 1e-5, "loaded GraphModule")
        assert_rel_close(copy.deepcopy(gm)(x), expected, 1e-5, "deepcopied GraphModule")


def test_symbolic_trace_of_a_block_and_of_a_fallback_model():
    """A block traced as the root is traced through its plain path; a model whose ReLU was replaced
    traces through torchvision's ops. Both give the eager numbers."""
    torch.manual_seed(0)
    block = randomize_bn_(fastres.Bottleneck(64, 16, stride=2, downsample=nn.Sequential(
        nn.Conv2d(64, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64)))).eval()
    x = randn(2, 64, 16, 16, seed=2)
    gm = torch.fx.symbolic_trace(block)
    with torch.no_grad():
        assert_rel_close(gm(x), block(x), what="traced block")
    model = _model("resnet18", "eval")
    model.relu = nn.ReLU6()   # the stem's ReLU is not a ReLU any more: the model runs its modules
    gm = torch.fx.symbolic_trace(model)
    assert "relu" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    x = randn(2, 3, 32, 32, seed=3)
    with torch.no_grad():
        assert_rel_close(gm(x), model(x), what="fallback model")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_feature_extraction(name, mode):
    """torchvision's create_feature_extractor: the eager features (forward hooks on a twin), fused nodes in
    the graph, the model keeps its mode, the extractor switches mode like the model."""
    model = _model(name, mode)
    twin = copy.deepcopy(model)
    last = _last_layer(name)
    extractor = tv_fe.create_feature_extractor(model, {"layer2": "mid", last: "out", "fc": "logits"})
    assert all(m.training == (mode == "train") for m in model.modules()), "the model's mode changed"
    assert extractor.training == (mode == "train")
    functions = [n.target for n in extractor.graph.nodes if n.op == "call_function"]
    assert fused_block in functions
    x = randn(*SHAPE, seed=4)
    for current in (mode, "eval" if mode == "train" else "train"):
        extractor.train(current == "train")
        twin.train(current == "train")
        captured = {}
        handles = [getattr(twin, layer).register_forward_hook(lambda m, i, o, key=key: captured.__setitem__(key, o))
                   for layer, key in (("layer2", "mid"), (last, "out"), ("fc", "logits"))]
        with torch.no_grad():
            expected = twin(x)
            got = extractor(x)
        for h in handles:
            h.remove()
        assert list(got) == ["mid", "out", "logits"]
        assert_rel_close(got["logits"], expected, 1e-5, f"{name} {current} logits")
        for key in ("mid", "out"):
            assert_rel_close(got[key], captured[key], 1e-5, f"{name} {current} {key}")
        for (key, buf), (_, twin_buf) in zip(model.named_buffers(), twin.named_buffers()):
            if buf.is_floating_point():
                assert_rel_close(buf, twin_buf, 1e-5, f"{name} {current} buffer {key}")
            else:
                assert_exactly_equal(buf, twin_buf, f"{name} {current} buffer {key}")


@pytest.mark.parametrize("name", ["resnet50", "resnet_v2_18", "cifar_resnet20"])
def test_graph_node_names(name):
    model = _model(name, "eval")
    train_nodes, eval_nodes = tv_fe.get_graph_node_names(model)
    assert train_nodes == eval_nodes
    assert not model.training and not any(m.training for m in model.modules())
    last = _last_layer(name)
    assert sum(n.startswith(f"{last}.") for n in train_nodes) == len(getattr(model, last))
    assert train_nodes[:2] == ["x", "model_input"] and train_nodes[-1] == "fc"


def test_fastres_feature_extraction_keeps_every_mode_after_a_failure():
    """torchvision's functions set one mode for the whole model (and leave it in train mode when they raise);
    fastres's keep each module's own flag, on success and on failure."""
    model = _model("resnet18", "train")
    model.layer1[0].bn1.eval()      # a mixed-mode model: frozen statistics in one BN
    modes = [m.training for m in model.modules()]
    with pytest.raises(ValueError, match="is not present in model"):
        fastres.create_feature_extractor(model, {"layer9": "out"})
    assert [m.training for m in model.modules()] == modes
    extractor = fastres.create_feature_extractor(model, {"layer4": "out"})
    assert [m.training for m in model.modules()] == modes
    assert extractor(randn(*SHAPE, seed=6))["out"].shape == (2, 512, 1, 1)
    train_nodes, eval_nodes = fastres.get_graph_node_names(model)
    assert train_nodes == eval_nodes and [m.training for m in model.modules()] == modes

    class Untraceable(nn.Module):   # data-dependent control flow: FX fails while tracing
        def __init__(self):
            super().__init__()
            self.net = _model("resnet18", "eval")

        def forward(self, x):
            return self.net(x) if x.sum() > 0 else x

    wrapper = Untraceable().eval()
    with pytest.raises(torch.fx.proxy.TraceError):
        fastres.create_feature_extractor(wrapper, {"net.layer4": "out"})
    assert not any(m.training for m in wrapper.modules())
    with pytest.raises(TypeError):
        fastres.create_feature_extractor("resnet18", {"layer4": "out"})


def test_feature_extractor_deepcopies_and_shares_the_model():
    model = _model("resnet50", "eval")
    extractor = tv_fe.create_feature_extractor(model, {"layer3": "f"})
    assert getattr(extractor.layer3, "0").conv1.weight is model.layer3[0].conv1.weight
    twin = copy.deepcopy(extractor).eval()   # torchvision's DualGraphModule deepcopies into train mode
    x = randn(*SHAPE, seed=7)
    with torch.no_grad():
        assert_rel_close(twin(x)["f"], extractor(x)["f"], 1e-6, "deepcopied extractor")


# -------------------------------------------------------------------------------------------- TorchScript

def _round_trip(scripted):
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_script_and_save_load(name, mode):
    """torch.jit.script (the plain path) and a save/load round trip: eval and training outputs within
    torchvision's tolerances, training-mode running statistics updated like eager."""
    model = _model(name, mode)
    eager, scripted_source, loaded_source = (copy.deepcopy(model) for _ in range(3))
    scripted = torch.jit.script(scripted_source)
    loaded = _round_trip(torch.jit.script(loaded_source))
    x = randn(*SHAPE, seed=8)
    with torch.no_grad():
        expected = eager(x)
        assert_rel_close(scripted(x), expected, SCRIPT_RTOL, f"scripted {name} {mode}")
        assert_rel_close(loaded(x), expected, ROUND_TRIP_RTOL, f"loaded {name} {mode}")
    for key, value in eager.state_dict().items():
        for what, other in (("scripted", scripted), ("loaded", loaded)):
            got = other.state_dict()[key]
            if value.is_floating_point():
                assert_rel_close(got, value, SCRIPT_RTOL, f"{what} {name} {mode} {key}")
            else:
                assert_exactly_equal(got, value, f"{what} {name} {mode} {key}")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # torch's own batch-size check in F.batch_norm
def test_jit_trace(name):
    """torch.jit.trace records the plain path: eval (with torch's trace check) and training (outputs,
    gradients and buffers of one step), for other inputs than the traced one too."""
    model = _model(name, "eval")
    x, other = randn(*SHAPE, seed=9), randn(*SHAPE, seed=10)
    traced = torch.jit.trace(copy.deepcopy(model), x)
    with torch.no_grad():
        for inp in (x, other):
            assert_rel_close(traced(inp), model(inp), SCRIPT_RTOL, f"traced {name} eval")
        assert_rel_close(_round_trip(traced)(other), model(other), ROUND_TRIP_RTOL, f"loaded traced {name}")
    model.train()
    source = copy.deepcopy(model)
    traced = torch.jit.trace(source, x, check_trace=False)    # the tracing run updated the running stats:
    traced.load_state_dict(model.state_dict())                 # start both from the same buffers
    _compare_steps(_step(traced, other), _step(model, other), 1e-5, f"traced {name} train")


def test_script_a_converted_torchvision_model():
    """A torchvision model converted by fastres.convert stays scriptable (its blocks' plain path)."""
    torch.manual_seed(0)
    tv = randomize_bn_(tv_resnet.resnet18(num_classes=10)).eval()
    converted = fastres.convert(copy.deepcopy(tv))
    scripted = torch.jit.script(converted)
    x = randn(*SHAPE, seed=11)
    with torch.no_grad():
        assert_rel_close(scripted(x), tv(x), SCRIPT_RTOL, "scripted converted")
