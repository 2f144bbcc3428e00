"""The eval-time BN-folding cache must never serve stale weights.

Pattern of every test: a fastres model and its torchvision twin in eval mode; one forward fills
the cache; then one kind of change is applied (to both, or to fastres and mirrored into the twin
through its state_dict), and fastres must again equal torchvision. Each change is checked to move
the output by far more than the tolerance, so a stale cache cannot pass by accident.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import copy
import threading

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import fastres
import fastres.nn
from helpers import assert_rel_close, build_pair, randn, randomize_bn_, rel_error

MODELS = ["resnet18", "resnet50"]
X_SHAPE = (2, 3, 32, 32)


@pytest.fixture(scope="module", params=MODELS)
def pristine(request):
    tv, fr = build_pair(request.param, num_classes=10)
    return request.param, tv.eval(), fr.eval()


@pytest.fixture
def pair(pristine):
    name, tv, fr = pristine
    return name, copy.deepcopy(tv), copy.deepcopy(fr)


def _out(model, x, backend=None):
    ctx = fastres.use_backend(backend) if backend else contextlib.nullcontext()
    with ctx, torch.no_grad():
        return model(x)


def _check(tv, fr, x, what, rtol=None, backend=None):
    expected = _out(tv, x)
    actual = _out(fr, x, backend)
    assert_rel_close(actual, expected, rtol, what)
    return expected


def _prime(tv, fr, x):
    """Fill every cache (NCHW, channels_last, both backends) and return the reference output."""
    for backend in (None, "torch"):
        for cl in (False, True):
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x
            _check(tv, fr, xi, f"before the change (backend={backend}, channels_last={cl})", backend=backend)
    return _out(tv, x)


def _check_after(tv, fr, x, before, what):
    after = _out(tv, x)
    assert rel_error(after, before) > 1e-3, f"{what}: the change did not move the output; the test is void"
    for backend in (None, "torch"):
        for cl in (False, True):
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x
            _check(tv, fr, xi, f"{what} (backend={backend}, channels_last={cl})", backend=backend)


# ---- changes applied identically to both models --------------------------------------------

def _tail_bn(model):
    """The BN whose fold is part of the fused Bottleneck tail (or BasicBlock's second BN)."""
    block = model.layer2[0]
    return block.bn3 if hasattr(block, "bn3") else block.bn2


def _noise(t, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t.shape, generator=g, dtype=torch.float64) * scale).to(t.dtype)


def _inplace(get, op):
    def change(model):
        with torch.no_grad():
            op(get(model))
    return change


CHANGES = {
    # in-place edits through the tensor itself (version counter bumps)
    "stem_conv_weight_add_": _inplace(lambda m: m.conv1.weight, lambda t: t.add_(_noise(t, 1, 0.05))),
    "block_conv_weight_mul_": _inplace(lambda m: m.layer1[0].conv1.weight, lambda t: t.mul_(-1.5)),
    "bn_weight_mul_": _inplace(lambda m: m.layer1[0].bn1.weight, lambda t: t.mul_(3)),
    "bn_bias_add_": _inplace(lambda m: m.layer1[0].bn1.bias, lambda t: t.add_(1.0)),
    "bn_running_mean_add_": _inplace(lambda m: m.layer1[0].bn1.running_mean, lambda t: t.add_(_noise(t, 2, 2.0))),
    "bn_running_var_mul_": _inplace(lambda m: m.layer1[0].bn1.running_var, lambda t: t.mul_(0.01)),
    "stem_bn_running_var_mul_": _inplace(lambda m: m.bn1.running_var, lambda t: t.mul_(0.05)),
    "tail_bn_weight_mul_": _inplace(_tail_bn, lambda bn: bn.weight.mul_(4)),
    "tail_bn_running_mean_add_": _inplace(_tail_bn, lambda bn: bn.running_mean.add_(3)),
    "downsample_conv_weight_mul_": _inplace(lambda m: m.layer2[0].downsample[0].weight, lambda t: t.mul_(5)),
    "downsample_bn_running_var_mul_": _inplace(lambda m: m.layer2[0].downsample[1].running_var,
                                               lambda t: t.mul_(0.02)),
    "fc_weight_mul_": _inplace(lambda m: m.fc.weight, lambda t: t.mul_(2)),
    "copy_into_weight": _inplace(lambda m: m.layer3[0].conv2.weight, lambda t: t.copy_(_noise(t, 3, 0.2))),
    "fill_bn_bias": _inplace(lambda m: m.layer3[0].bn2.bias, lambda t: t.fill_(0.7)),
    "zero_running_mean": _inplace(lambda m: m.layer2[0].bn1.running_mean, lambda t: t.zero_().add_(1.5)),
    "conv_reset_parameters": lambda m: (torch.manual_seed(5), m.layer1[0].conv1.reset_parameters()),
    "bn_reset_running_stats": lambda m: [b.reset_running_stats() for b in m.modules()
                                         if isinstance(b, nn.BatchNorm2d)],
    # attribute changes
    "bn_eps": lambda m: [setattr(b, "eps", 1e-1) for b in m.modules() if isinstance(b, nn.BatchNorm2d)],
    # replacing storage: param.data = new tensor, buffers reassigned
    "param_data_assign": lambda m: setattr(m.layer1[0].conv1.weight, "data", m.layer1[0].conv1.weight.data * 2 + 0.01),
    "bn_param_data_assign": lambda m: setattr(m.layer1[0].bn1.weight, "data", m.layer1[0].bn1.weight.data * 4),
    "buffer_reassign": lambda m: setattr(m.layer1[0].bn1, "running_var", m.layer1[0].bn1.running_var * 0.01),
    "parameter_reassign": lambda m: setattr(m.layer1[0].bn1, "bias", nn.Parameter(m.layer1[0].bn1.bias + 2)),
    # replacing modules
    "replace_bn_module": lambda m: setattr(m.layer1[0], "bn1", randomize_bn_(
        nn.BatchNorm2d(m.layer1[0].bn1.num_features).eval(), 9)),
    "replace_conv_module": lambda m: (torch.manual_seed(6), setattr(m.layer1[0], "conv1", nn.Conv2d(
        m.layer1[0].conv1.in_channels, m.layer1[0].conv1.out_channels, 1 if hasattr(m.layer1[0], "bn3") else 3,
        padding=0 if hasattr(m.layer1[0], "bn3") else 1, bias=False))),
    "conv_gets_bias": lambda m: (setattr(m.layer1[0].conv1, "bias", nn.Parameter(
        _noise(torch.empty(m.layer1[0].conv1.out_channels), 7, 1.0)))),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_change_invalidates_cache(pair, change):
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    before = _prime(tv, fr, x)
    CHANGES[change](tv)
    CHANGES[change](fr)
    _check_after(tv, fr, x, before, f"{name} after {change}")


# ---- edits through .data ---------------------------------------------------------------------
# Edits through .detach() or state_dict() tensors share the parameter's version counter: the
# cache sees them. `.data` gets a fresh version counter from PyTorch, so nothing can see edits
# through it short of re-reading every weight on every forward; the documented remedy is
# fastres.nn.clear_fold_cache() (or FASTRES_FOLD_CACHE=0).

SHARED_COUNTER_EDITS = {
    "detach_copy_": lambda m: m.layer1[0].conv1.weight.detach().mul_(-2),
    "state_dict_tensor_copy_": lambda m: m.state_dict()["layer1.0.bn1.running_var"].mul_(0.01),
}

DATA_EDITS = {
    "conv_weight_data_mul_": lambda m: m.layer1[0].conv1.weight.data.mul_(-2),
    "bn_weight_data_mul_": lambda m: m.layer1[0].bn1.weight.data.mul_(3),
    "bn_bias_data_add_": lambda m: m.layer1[0].bn1.bias.data.add_(1),
    "running_var_data_mul_": lambda m: m.layer1[0].bn1.running_var.data.mul_(0.01),
    "running_mean_data_add_": lambda m: m.layer1[0].bn1.running_mean.data.add_(2),
    "state_dict_keep_vars_data": lambda m: m.state_dict(keep_vars=True)["layer1.0.bn1.weight"].data.mul_(3),
}


ALIAS_EDITS = {**{name: (edit, False) for name, edit in SHARED_COUNTER_EDITS.items()},
               **{name: (edit, True) for name, edit in DATA_EDITS.items()}}


@pytest.mark.parametrize("change", list(ALIAS_EDITS))
def test_edit_through_aliases(pair, change):
    """Shared-counter edits are seen by the cache itself; .data edits after clear_fold_cache()."""
    name, tv, fr = pair
    edit, needs_clear = ALIAS_EDITS[change]
    x = randn(*X_SHAPE, seed=1)
    before = _prime(tv, fr, x)
    with torch.no_grad():
        edit(tv)
        edit(fr)
    if needs_clear:
        fastres.nn.clear_fold_cache()
    _check_after(tv, fr, x, before, f"{name} after {change}" + (" and clear_fold_cache()" if needs_clear else ""))


def test_fold_cache_can_be_turned_off():
    """FASTRES_FOLD_CACHE=0 folds on every forward, so even .data edits are seen."""
    code = (
        "import torch, torchvision, fastres\n"
        "torch.manual_seed(0)\n"
        "tv = torchvision.models.resnet18(num_classes=10).eval()\n"
        "fr = fastres.from_torchvision(tv)\n"
        "x = torch.randn(1, 3, 32, 32)\n"
        "with torch.no_grad():\n"
        "    fr(x)\n"
        "    for m in (tv, fr): m.layer1[0].bn1.running_var.data.mul_(0.01)\n"
        "    a, b = fr(x), tv(x)\n"
        "print(((a - b).abs().max() / b.abs().max()).item())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FASTRES_FOLD_CACHE": "0"})
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.strip()) < 1e-4


def test_param_data_reassign_storage_reuse(pair):
    """`p.data = new` keeps p's identity and version; if the allocator hands back the old address
    the key (id, data_ptr, version) repeats while the values differ."""
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    before = _prime(tv, fr, x)
    for model in (tv, fr):
        w = model.layer1[0].conv1.weight
        w.data = w.data * 2          # new storage, the old one freed
        w.data = w.data + 0.05       # very likely lands on the freed block
        w.data = w.data * -1
    _check_after(tv, fr, x, before, f"{name} after repeated param.data assignments")


def test_load_state_dict_of_other_weights(pair):
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    before = _prime(tv, fr, x)
    torch.manual_seed(42)
    other = randomize_bn_(getattr(tvm, name)(num_classes=10), 43).state_dict()
    tv.load_state_dict(other)
    fr.load_state_dict(other)
    _check_after(tv, fr, x, before, f"{name} after load_state_dict")
    # assign=True swaps in the given tensors themselves
    torch.manual_seed(44)
    other2 = randomize_bn_(getattr(tvm, name)(num_classes=10), 45).state_dict()
    before = _out(tv, x)
    tv.load_state_dict({k: v.clone() for k, v in other2.items()}, assign=True)
    fr.load_state_dict({k: v.clone() for k, v in other2.items()}, assign=True)
    _check_after(tv, fr, x, before, f"{name} after load_state_dict(assign=True)")


def test_vector_to_parameters(pair):
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    before = _prime(tv, fr, x)
    vec = torch.nn.utils.parameters_to_vector(fr.parameters())
    vec = vec * (1 + 0.3 * torch.rand(vec.shape, generator=torch.Generator().manual_seed(3)))
    torch.nn.utils.vector_to_parameters(vec.clone(), tv.parameters())
    torch.nn.utils.vector_to_parameters(vec.clone(), fr.parameters())
    _check_after(tv, fr, x, before, f"{name} after vector_to_parameters")


# ---- training changes: fastres trains, the twin mirrors its state_dict -----------------------

def _labels(n, seed):
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=2e-3, momentum=0.9),
    "sgd_momentum_fused": lambda ps: torch.optim.SGD(ps, lr=2e-3, momentum=0.9, fused=True),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizer_step_invalidates_cache(pair, optimizer):
    """Fused optimizers update parameters in place without bumping their version counters
    (torch 2.x on CPU); the cache must still see the new values."""
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    before = _prime(tv, fr, x)
    try:
        opt = OPTIMIZERS[optimizer](fr.parameters())
    except (RuntimeError, ValueError) as error:
        pytest.skip(f"{optimizer} not available here: {error}")
    fr.train()
    for step in range(2):
        opt.zero_grad()
        y = fr(randn(4, 3, 32, 32, seed=100 + step))
        torch.nn.functional.cross_entropy(y, _labels(4, step)).backward()
        opt.step()
    fr.eval()
    tv.load_state_dict(fr.state_dict())
    _check_after(tv, fr, x, before, f"{name} after {optimizer} steps")


def test_train_forward_updates_stats_then_eval(pair):
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    before = _prime(tv, fr, x)
    for model in (tv, fr):
        model.train()
        with torch.no_grad():
            model(randn(4, 3, 32, 32, seed=7) * 3 + 1)   # running statistics move a lot
        model.eval()
    for key, value in tv.state_dict().items():
        if value.is_floating_point():
            assert_rel_close(fr.state_dict()[key], value, what=f"{key} after the train-mode forward")
        else:
            assert torch.equal(fr.state_dict()[key], value), f"{key} after the train-mode forward"
    _check_after(tv, fr, x, before, f"{name} after train() forward + eval()")


def test_eval_train_eval_without_changes_is_stable(pair):
    """Switching modes without a forward changes nothing; a second eval forward hits the cache."""
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    y = _prime(tv, fr, x)
    fr.train()
    fr.eval()
    assert_rel_close(_out(fr, x), y, what="after train()/eval() with no forward")


# ---- dtype changes ----------------------------------------------------------------------------

def test_double_then_float(pair):
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    _prime(tv, fr, x)
    tv.double(), fr.double()
    y = _out(fr, x.double())
    assert y.dtype == torch.float64
    assert_rel_close(y, _out(tv, x.double()), 1e-10, f"{name} after .double()")
    # fp64 edit, back to fp32: the fp32 fold must come from the edited values
    with torch.no_grad():
        for model in (tv, fr):
            model.layer1[0].bn1.running_var.mul_(0.01)
    assert_rel_close(_out(fr, x.double()), _out(tv, x.double()), 1e-10, f"{name} fp64 edit")
    tv.float(), fr.float()
    _check(tv, fr, x, f"{name} back to float32")
    _check(tv, fr, x, f"{name} back to float32", backend="torch")
    tv.to(torch.float64), fr.to(torch.float64)
    assert_rel_close(_out(fr, x.double()), _out(tv, x.double()), 1e-10, f"{name} after .to(float64)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_round_trip(pair):
    """CPU -> GPU -> edit on the GPU -> CPU: each device folds from the values it holds now."""
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    _prime(tv, fr, x)
    tv.cuda(), fr.cuda()
    assert_rel_close(_out(fr, x.cuda()).cpu(), _out(tv, x.cuda()).cpu(), 1e-4, f"{name} on the GPU")
    with torch.no_grad():
        for model in (tv, fr):
            model.layer1[0].bn1.running_var.mul_(0.01)
    assert_rel_close(_out(fr, x.cuda()).cpu(), _out(tv, x.cuda()).cpu(), 1e-4, f"{name} GPU edit")
    tv.cpu(), fr.cpu()
    _check(tv, fr, x, f"{name} back on the CPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_after_fp32_forward(pair, dtype):
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    exact = _prime(tv, fr, x)
    try:
        expected = _out(copy.deepcopy(tv).to(dtype), x.to(dtype))
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torchvision itself cannot run {dtype} on CPU here: {error}")
    fr.to(dtype)
    y = _out(fr, x.to(dtype))
    assert y.dtype == dtype, f"output dtype {y.dtype}, expected {dtype}: stale fp32 weights?"
    # Both are a rounding of the fp32 answer; fastres must not be much further from it.
    tol = {torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]
    assert rel_error(y, exact) <= max(tol, 3 * rel_error(expected, exact)), (
        f"{dtype}: fastres {rel_error(y, exact):.3g} from fp32, torchvision {rel_error(expected, exact):.3g}")
    fr.float()
    tv.to(dtype).float()      # the same rounding of the weights
    _check(tv, fr, x, f"{name} back to float32 after {dtype}")


# ---- autograd in eval mode (frozen BN fine-tuning) -------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_mode_gradients_match_torchvision(pair, dtype):
    name, tv, fr = pair
    tv.to(dtype), fr.to(dtype)
    x = randn(*X_SHAPE, seed=1, dtype=dtype)
    with torch.no_grad():
        y_nograd = fr(x)                   # fills the cache
    results = {}
    for key, model in (("tv", tv), ("fr", fr)):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (y * randn(*y.shape, seed=3, dtype=dtype)).sum().backward()
        results[key] = (y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()})
    rtol = None
    y_fr, gx_fr, g_fr = results["fr"]
    y_tv, gx_tv, g_tv = results["tv"]
    assert_rel_close(y_fr, y_tv, rtol, "eval output with grad enabled")
    assert_rel_close(y_fr, y_nograd, rtol, "grad-enabled vs no_grad eval output")
    assert_rel_close(gx_fr, gx_tv, rtol, "eval input grad")
    for n, g in g_tv.items():
        assert g_fr[n] is not None, f"{n}: no gradient in eval mode (fold not differentiable?)"
        assert_rel_close(g_fr[n], g, rtol, f"eval grad {n}")
    # Eval mode leaves running statistics alone.
    for key, value in tv.state_dict().items():
        assert torch.equal(fr.state_dict()[key], value), f"{key} changed in eval mode"


def test_frozen_bn_finetuning_steps(pair):
    """Eval-mode BN (frozen statistics), trainable weights: SGD steps alternate with no_grad
    evaluation, so the fold is re-derived after each step. (Gradient equality itself is
    test_eval_mode_gradients_match_torchvision; here the twin mirrors fastres's weights.)"""
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    first = _prime(tv, fr, x)
    stats = {k: v.clone() for k, v in fr.state_dict().items() if "running" in k or "num_batches" in k}
    opt = torch.optim.SGD(fr.parameters(), lr=1e-3, momentum=0.9)
    for step in range(3):
        opt.zero_grad()
        y = fr(randn(4, 3, 32, 32, seed=300 + step))
        torch.nn.functional.cross_entropy(y, _labels(4, 400 + step)).backward()
        opt.step()
        tv.load_state_dict(fr.state_dict())
        _check(tv, fr, x, f"{name} frozen-BN step {step}")
        _check(tv, fr, x, f"{name} frozen-BN step {step}", backend="torch")
    assert rel_error(_out(tv, x), first) > 1e-3, "the steps did not move the output; the test is void"
    for key, value in stats.items():
        assert torch.equal(fr.state_dict()[key], value), f"{key} changed during eval-mode fine-tuning"


def test_inference_mode_then_input_gradient(pair):
    """Frozen weights (requires_grad False): a forward under inference_mode, then a forward that
    needs the input gradient (saliency / adversarial examples) with the same model."""
    name, tv, fr = pair
    for model in (tv, fr):
        model.requires_grad_(False)
    x = randn(*X_SHAPE, seed=1)
    with torch.inference_mode():
        assert_rel_close(fr(x), tv(x), what="inference_mode output")
    grads = {}
    for key, model in (("tv", tv), ("fr", fr)):
        xi = x.clone().requires_grad_(True)
        model(xi).logsumexp(1).sum().backward()
        grads[key] = xi.grad
    assert_rel_close(grads["fr"], grads["tv"], what="input gradient after inference_mode forward")


def test_inference_mode_outputs_and_edits(pair):
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    with torch.inference_mode():
        y = fr(x)
        assert_rel_close(y, tv(x), what="inference_mode")
    before = _out(tv, x)
    with torch.inference_mode():
        for model in (tv, fr):
            model.layer1[0].bn1.running_var.mul_(0.01)   # in-place on a normal tensor in inference mode
        assert_rel_close(fr(x), tv(x), what="inference_mode after an in-place edit")
    _check_after(tv, fr, x, before, f"{name} after an inference_mode edit")


# ---- hooks added and removed after the cache is filled ----------------------------------------

def test_hook_added_after_caching(pair):
    name, tv, fr = pair
    x = randn(*X_SHAPE, seed=1)
    before = _prime(tv, fr, x)
    handles = [m.layer1[0].bn1.register_forward_hook(lambda mod, i, o: o * 0.25) for m in (tv, fr)]
    _check_after(tv, fr, x, before, f"{name} after adding a hook")
    for h in handles:
        h.remove()
    _check(tv, fr, x, f"{name} after removing the hook")
    assert_rel_close(_out(fr, x), before, what="back to the original output")


# ---- threads ----------------------------------------------------------------------------------

def test_concurrent_inference_on_one_model(pair):
    name, tv, fr = pair
    inputs = [randn(1 + i % 2, 3, 32, 32, seed=500 + i) for i in range(4)]
    expected = [_out(tv, x) for x in inputs]
    fresh = copy.deepcopy(fr)           # empty cache: the threads race to fill it
    errors = []
    barrier = threading.Barrier(len(inputs))

    def worker(i):
        try:
            barrier.wait()
            backend = "torch" if i % 2 else None
            for _ in range(3):
                y = _out(fresh, inputs[i], backend)
                assert_rel_close(y, expected[i], what=f"thread {i}")
        except BaseException as error:   # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {error!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_concurrent_inference_while_other_model_changes(pair):
    """One thread keeps running inference on model A while the main thread edits model B:
    A's results never change."""
    name, tv, fr = pair
    other = copy.deepcopy(fr)
    x = randn(*X_SHAPE, seed=1)
    expected = _out(tv, x)
    stop = threading.Event()
    errors = []

    def worker():
        try:
            while not stop.is_set():
                assert_rel_close(_out(fr, x), expected, what="model A during edits of model B")
        except BaseException as error:   # noqa: BLE001
            errors.append(repr(error))

    t = threading.Thread(target=worker)
    t.start()
    try:
        for i in range(5):
            with torch.no_grad():
                other.layer1[0].bn1.running_var.mul_(0.5)
            _out(other, x)
    finally:
        stop.set()
        t.join(timeout=120)
    assert not errors, errors
