"""torch.compile and torch.export of fastres models: one graph, no breaks, the eager numbers.

Under tracing the eval-time fold cache and the CPU oneDNN path step aside (version counters
and packed-weight caches are not traceable), so the graph folds BN itself; the custom ops
of the Triton and C++ backends trace through their fake implementations. (Per-backend
compile tests of the Triton and C++ ops live with those backends' tests.)
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastres

from helpers import assert_rel_close, backend_scope, randn, randomize_bn_

FAMILIES = {"resnet18": dict(num_classes=10), "resnet50": dict(num_classes=10),
            "resnet_v2_18": dict(num_classes=10), "cifar_resnet20": {}}


def _model(name):
    torch.manual_seed(0)
    return randomize_bn_(getattr(fastres, name)(**FAMILIES[name]))


def _step(model, x, run=None):
    """Training forward (through `run`, a compiled `model`) + backward: (output, {param: grad}, {buffer: value})."""
    model.zero_grad(set_to_none=True)
    y = (model if run is None else run)(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return (y.detach(), {n: p.grad for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("name,backend", [(name, "default") for name in FAMILIES] + [("resnet50", "torch")])
def test_compile_fullgraph_eval(name, backend):
    model = _model(name).eval()
    x = randn(2, 3, 32, 32, seed=1, channels_last=True)
    with backend_scope(backend), torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert_rel_close(got, expected, what=f"compiled {name} eval")


@pytest.mark.parametrize("name", FAMILIES)
def test_compile_fullgraph_train_step(name):
    """Outputs, every gradient and every buffer (running stats, num_batches_tracked) as in eager."""
    model = _model(name).train()
    twin = copy.deepcopy(model)
    x = randn(4, 3, 32, 32, seed=2)
    y_e, grads_e, buffers_e = _step(twin, x)
    torch._dynamo.reset()
    y_c, grads_c, buffers_c = _step(model, x, torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert_rel_close(y_c, y_e, what="compiled train output")
    for key in grads_e:
        assert_rel_close(grads_c[key], grads_e[key], 1e-3, what=f"grad {key}")
    for key in buffers_e:
        if buffers_e[key].is_floating_point():
            assert_rel_close(buffers_c[key], buffers_e[key], what=f"buffer {key}")
        else:
            assert torch.equal(buffers_c[key], buffers_e[key]), key


def test_compile_inductor_eval():
    """The real compiler, not just the tracer: Inductor generates and runs C++ for the graph."""
    model = _model("resnet18").eval()
    x = randn(2, 3, 32, 32, seed=3)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True)(x)
    assert_rel_close(got, expected, what="inductor eval")


# Triton's CPU interpreter runs every tile in Python (minutes per exported ResNet run), so
# without a GPU the Triton case checks the trace only; its kernels' numbers are tested elsewhere.
RUN_EXPORTED = {b: b != "triton" or torch.cuda.is_available() for b in fastres.available_backends() + ["default"]}
EXPORT_CASES = ([(name, backend) for name in ("resnet18", "resnet50") for backend in fastres.available_backends()]
                + [(name, "default") for name in ("resnet_v2_18", "cifar_resnet20")])


@pytest.mark.parametrize("name,backend", EXPORT_CASES)
def test_export_eval(name, backend, tmp_path):
    """torch.export traces every custom op through its fake implementation; the exported program
    (also after a save/load round trip) gives the eager numbers, for other inputs too."""
    model = _model(name).eval()
    x, other = randn(2, 3, 32, 32, seed=4), randn(2, 3, 32, 32, seed=5)
    with backend_scope(backend):
        program = torch.export.export(model, (x,))
        if backend in ("triton", "cpp"):
            targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
            assert any(t.startswith("fastres.") for t in targets), f"no fastres op in the exported graph: {targets}"
        if not RUN_EXPORTED[backend]:
            return
        torch.export.save(program, tmp_path / "model.pt2")
        loaded = torch.export.load(tmp_path / "model.pt2")
        with torch.no_grad():
            for inp in (x, other):
                expected = model(inp)
                assert_rel_close(program.module()(inp), expected, what=f"exported {name}")
                assert_rel_close(loaded.module()(inp), expected, what=f"loaded {name}")
