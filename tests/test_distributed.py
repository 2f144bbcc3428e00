"""fastres models in distributed training: DistributedDataParallel over gloo with two CPU processes,
and nn.SyncBatchNorm conversion.

Proves:
- DDP keeps fastres replicas in step: parameters bitwise equal on both ranks, buffers exactly as DDP
  defines them (each rank's last forward updates its own statistics; the next forward broadcasts
  rank 0's), and the replicas follow torchvision trained the same way under DDP (float64, 1e-8).
- fastres's norm layers are exactly nn.BatchNorm2d, so convert_sync_batchnorm replaces every one of
  them, keeps the state_dict, and the converted net trains like torchvision's converted net; inside a
  process group the fastres blocks hand their input to torch's SyncBatchNorm.forward.

No stale folds: DDP broadcasts rank 0's buffers without bumping version counters, so after an
eval forward of the bare module a DDP eval forward on rank 1 must still use rank 0's statistics.

Each DDP test spawns its own two processes (mostly time spent importing torch in them).
Training comparisons with torchvision are float64: fp32 training under DDP is chaotic here (measured
after 3 steps: torchvision fp32 is 3% from float64 on some parameter updates, fastres "cpp" fp32 20%,
where one ReLU sign flip is enough), so an fp32 tolerance would test rounding luck; in float64 fastres
and torchvision agree to 1e-12.
"""
from __future__ import annotations

import copy
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel
from torchvision.models import resnet as tv_resnet

import fastres
from helpers import (TOLERANCE, assert_exactly_equal, assert_rel_close, assert_state_dicts_equal, backend_scope,
                     build_pair, compare_train_results, randn, randomize_bn_, train_step)

TRAIN_RTOL64 = TOLERANCE["train"][torch.float64]  # fastres "cpp" vs torchvision after 3 DDP steps measured 1.3e-12

WORLD_SIZE = 2
STEPS = 3
TRAIN_SHAPE = (2, 3, 48, 48)   # per rank; layer4 at 2x2: 8 values per channel for BatchNorm
BACKENDS = ["default", pytest.param("cpp", marks=pytest.mark.skipif(
    "cpp" not in fastres.available_backends(), reason="fastres._C is not built"))]
BLOCKS = (tv_resnet.BasicBlock, tv_resnet.Bottleneck)


# ---------------------------------------------------------------------------------------------
# running code on two processes
# ---------------------------------------------------------------------------------------------

def _rank_main(rank, worker, init_file, out_dir, args):
    # One thread per process: two ranks share this machine's cores, and thread count changes
    # CPU reduction orders, which the bitwise cross-rank checks must not depend on.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=120))
    try:
        torch.save(worker(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _on_two_ranks(worker, tmp_path, *args):
    """[worker(0, *args), worker(1, *args)], each run in its own process inside one gloo group.

    An exception on either rank is re-raised here (mp.spawn stops the other rank) with the
    worker's traceback in the message."""
    mp.spawn(_rank_main, args=(worker, str(tmp_path / "rendezvous"), str(tmp_path), args), nprocs=WORLD_SIZE,
             join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _small_torchvision_net():
    """Every part of a ResNet (stem, identity and projection shortcuts, head) at a fraction of resnet18's cost;
    the same seeds on every rank give the same net."""
    torch.manual_seed(0)
    return randomize_bn_(tv_resnet.ResNet(tv_resnet.BasicBlock, [1, 1, 1, 1], num_classes=10), 1)


def _batch(step, rank, dtype):
    x = randn(*TRAIN_SHAPE, seed=100 * step + rank, dtype=dtype)
    labels = torch.randint(0, 10, TRAIN_SHAPE[:1], generator=torch.Generator().manual_seed(100 * step + rank))
    return x, labels


def _state(model):
    return ({name: p.detach().clone() for name, p in model.named_parameters()},
            {name: b.detach().clone() for name, b in model.named_buffers()})


# ---------------------------------------------------------------------------------------------
# 1. DistributedDataParallel
# ---------------------------------------------------------------------------------------------

def _train_ddp_worker(rank, backend):
    """STEPS SGD steps under DDP on rank-specific data, then one eval forward on data shared by all ranks,
    for fastres in fp32 (the replica checks) and fastres and torchvision in float64 (the reference check)."""
    base = _small_torchvision_net()
    models = {
        "fastres fp32": (fastres.from_torchvision(base), backend),
        "fastres float64": (fastres.from_torchvision(base).double(), backend),
        "torchvision float64": (copy.deepcopy(base).double(), "default"),
    }
    results = {}
    for kind, (model, model_backend) in models.items():
        dtype = next(model.parameters()).dtype
        initial = _state(model)
        with backend_scope(model_backend):
            ddp = DistributedDataParallel(model)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
            ddp.train()
            for step in range(STEPS):
                x, labels = _batch(step, rank, dtype)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(x), labels).backward()
                optimizer.step()
            trained = _state(model)
            ddp.eval()
            with torch.no_grad():
                # The previous forward ran with autograd on, so DDP broadcasts rank 0's buffers before this one.
                out = ddp(randn(*TRAIN_SHAPE, seed=999, dtype=dtype))
            synced = _state(model)
        results[kind] = {"initial": initial, "trained": trained, "synced": synced, "eval_out": out}
    return results


def _assert_same_on_ranks(tensors0, tensors1, what):
    assert list(tensors0) == list(tensors1), f"{what}: names differ"
    for name in tensors0:
        assert_exactly_equal(tensors1[name], tensors0[name], f"{what} {name} rank 1 vs rank 0")


def _assert_ddp_semantics(rank0, rank1, what):
    """What DDP guarantees between replicas, bit for bit."""
    params0, buffers0 = rank0["trained"]
    params1, buffers1 = rank1["trained"]
    _assert_same_on_ranks(params0, params1, f"{what} trained parameter")
    for name in buffers0:
        if name.endswith("num_batches_tracked"):
            assert_exactly_equal(buffers1[name], buffers0[name], f"{what} {name}")
            assert buffers0[name].item() == STEPS, f"{what} {name} = {buffers0[name].item()}, expected {STEPS}"
        else:
            # The last forward started from rank 0's broadcast statistics but updated them with each rank's
            # own batch, so they differ; this also shows the ranks trained on different data, i.e. the equal
            # parameters above come from DDP's gradient averaging, not from identical inputs.
            assert not torch.equal(buffers1[name], buffers0[name]), f"{what} {name}: same on both ranks after training"
    # The eval forward broadcast rank 0's buffers (and changes nothing in eval): now everything is rank 0's.
    _assert_same_on_ranks(rank0["synced"][0], params0, f"{what} parameter after eval forward (rank 0)")
    _assert_same_on_ranks(rank0["synced"][1], buffers0, f"{what} buffer after eval forward (rank 0)")
    _assert_same_on_ranks(rank0["synced"][0], rank1["synced"][0], f"{what} parameter after eval forward")
    _assert_same_on_ranks(rank0["synced"][1], rank1["synced"][1], f"{what} buffer after eval forward")
    assert_exactly_equal(rank1["eval_out"], rank0["eval_out"], f"{what} eval output rank 1 vs rank 0")


def _assert_trained_like(actual, expected, what):
    """fastres's updates (trained - initial) and eval output match torchvision's; compared as updates, since
    a 3-step change is small next to the weights and a tolerance on the weights alone would hide it."""
    for stage in ("trained", "synced"):
        for part in (0, 1):
            start, a, e = actual["initial"][part], actual[stage][part], expected[stage][part]
            assert list(a) == list(e), f"{what}: names differ"
            for name in e:
                if e[name].is_floating_point():
                    assert_rel_close(a[name] - start[name], e[name] - start[name], TRAIN_RTOL64,
                                     f"{what} {stage} update of {name}")
                else:
                    assert_exactly_equal(a[name], e[name], f"{what} {stage} {name}")
    assert_rel_close(actual["eval_out"], expected["eval_out"], TRAIN_RTOL64, f"{what} eval output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_gloo_two_processes_keeps_replicas_equal_and_matches_torchvision(tmp_path, backend):
    results = _on_two_ranks(_train_ddp_worker, tmp_path, backend)
    for kind in ("fastres fp32", "fastres float64"):
        _assert_ddp_semantics(results[0][kind], results[1][kind], f"{kind} [{backend}]")
    for rank, result in enumerate(results):
        _assert_trained_like(result["fastres float64"], result["torchvision float64"],
                             f"rank {rank} fastres vs torchvision [{backend}]")


def _eval_after_local_forward_worker(rank):
    """One DDP training step, then in eval: a forward of the bare module on this rank's own statistics
    followed by a DDP forward, which first broadcasts rank 0's statistics."""
    base = _small_torchvision_net()
    outputs = {}
    for kind, model in (("fastres", fastres.from_torchvision(base)), ("torchvision", copy.deepcopy(base))):
        ddp = DistributedDataParallel(model)
        x, labels = _batch(0, rank, torch.float32)
        F.cross_entropy(ddp(x), labels).backward()
        ddp.eval()
        x = randn(*TRAIN_SHAPE, seed=999)
        with torch.no_grad():
            model(x)
            outputs[kind] = ddp(x)
    return outputs


def test_ddp_eval_forward_uses_broadcast_statistics_after_a_local_forward(tmp_path):
    """Fails without fastres.nn.folding's wrapper around DDP._sync_buffers (rank 1 is then 7% off)."""
    results = _on_two_ranks(_eval_after_local_forward_worker, tmp_path)
    for rank, outputs in enumerate(results):
        assert_rel_close(outputs["fastres"], outputs["torchvision"], what=f"rank {rank} eval output vs torchvision")
    assert_exactly_equal(results[1]["fastres"], results[0]["fastres"], "eval output rank 1 vs rank 0")


# ---------------------------------------------------------------------------------------------
# 2. SyncBatchNorm
# ---------------------------------------------------------------------------------------------

def _norm_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (_NormBase, nn.GroupNorm, nn.LayerNorm))}


def _sync(model):
    return nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_norm_layers_are_batchnorm2d_and_convert_to_syncbatchnorm(name):
    tv, fr = build_pair(name, num_classes=10)
    norms = _norm_layers(fr)
    # Exactly BatchNorm2d (not a subclass): convert_sync_batchnorm converts only _BatchNorm instances, and
    # multi-GPU users rely on every norm layer becoming torch's SyncBatchNorm.
    assert norms and list(norms) == [n for n, m in tv.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(type(m) is nn.BatchNorm2d for m in norms.values()), {n: type(m).__name__ for n, m in norms.items()}

    sync_fr, sync_tv = _sync(fr), _sync(tv)
    converted = _norm_layers(sync_fr)
    assert list(converted) == list(norms)
    assert all(type(m) is nn.SyncBatchNorm for m in converted.values()), {
        n: type(m).__name__ for n, m in converted.items()}
    # Still a fastres net: its blocks (not torchvision's) run the converted layers.
    assert type(sync_fr) is fastres.ResNet
    assert [type(m) for m in sync_fr.modules() if isinstance(m, BLOCKS)] == \
           [type(m) for m in fr.modules() if isinstance(m, BLOCKS)]
    assert_state_dicts_equal(sync_fr.state_dict(), fr.state_dict(), f"{name} converted vs unconverted fastres")
    assert_state_dicts_equal(sync_fr.state_dict(), sync_tv.state_dict(), f"{name} converted fastres vs torchvision")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_syncbatchnorm_converted_trains_like_torchvision_without_process_group(name, backend):
    # Without a process group SyncBatchNorm.forward runs plain batch_norm, so the converted fastres net must
    # match the converted torchvision net and the unconverted fastres net (outputs, gradients, running stats).
    tv, fr = build_pair(name, num_classes=10)
    x = randn(*TRAIN_SHAPE, seed=3, dtype=torch.float64)
    expected = train_step(_sync(tv).double(), x, layer_hooks=True)
    with backend_scope(backend):
        converted = train_step(_sync(fr).double(), x, layer_hooks=True)
        unconverted = train_step(copy.deepcopy(fr).double(), x, layer_hooks=True)
    compare_train_results(converted, expected, TRAIN_RTOL64, f"{name} converted fastres vs torchvision [{backend}]")
    compare_train_results(unconverted, converted, TRAIN_RTOL64, f"{name} unconverted vs converted fastres [{backend}]")


def test_syncbatchnorm_converted_runs_torchs_syncbatchnorm_inside_a_process_group(tmp_path):
    # No two-process SyncBatchNorm training test: torch's SyncBatchNorm.forward rejects CPU tensors once a group exists.
    # What CPU can show: fastres's blocks call SyncBatchNorm.forward (raising as torchvision's net does) rather than
    # running their own, unsynchronised, BatchNorm.
    tv, fr = build_pair("resnet18", num_classes=10)
    sync_tv, sync_fr = _sync(tv).train(), _sync(fr).train()
    x = randn(*TRAIN_SHAPE, seed=3)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError) as expected:
            sync_tv(x)
        assert "SyncBatchNorm expected input tensor to be on GPU" in str(expected.value), (
            f"torch's SyncBatchNorm now accepts CPU tensors ({expected.value}): test training under DDP instead")
        for backend in fastres.available_backends():
            with fastres.use_backend(backend):
                try:
                    sync_fr(x)
                    actual = "no error"
                except ValueError as error:
                    actual = str(error)
            assert actual == str(expected.value), (
                f"[{backend}] converted fastres net: {actual!r}; torchvision's: {str(expected.value)!r}")
    finally:
        dist.destroy_process_group()
