"""fastres.convert: torchvision and timm ResNets and blocks at any depth become fastres's, in place, with
the same parameters and buffers (the very objects), state_dict keys, train/eval flags and numbers
(eval within the model tolerance; a training step exactly in float64 and as accurate as the original
in float32); what cannot convert exactly is left as it is.

CPU-sized on purpose: small inputs; detection and segmentation models at 64x64-ish images.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models import detection, segmentation
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import fastres
from fastres.models.timm_blocks import TimmBasicBlock, TimmBottleneck
from helpers import (TRAIN_SHAPE, assert_eval_matches, assert_exactly_equal, assert_rel_close,
                     assert_state_dicts_equal, assert_train_matches, randn, randomize_bn_, tv_model)

FASTRES_BLOCKS = (fastres.BasicBlock, fastres.Bottleneck)


def _snapshot(model):
    """Everything convert must keep: tensors by name (the objects themselves), their values, dtype,
    device and requires_grad, the state_dict keys and every parameterised module's train/eval flag."""
    return dict(
        tensors=OrderedDict(list(model.named_parameters()) + list(model.named_buffers())),
        values={k: v.detach().clone() for k, v in model.state_dict().items()},
        flags={k: (t.dtype, t.device, t.requires_grad) for k, t in
               list(model.named_parameters()) + list(model.named_buffers())},
        modes={name: m.training for name, m in model.named_modules()
               if list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))},
    )


def _assert_kept(model, before, what):
    after = _snapshot(model)
    assert list(after["tensors"]) == list(before["tensors"]), f"{what}: parameter/buffer names changed"
    for name, tensor in before["tensors"].items():
        assert after["tensors"][name] is tensor, f"{what}: {name} is not the same tensor any more"
    assert after["flags"] == before["flags"], f"{what}: dtype/device/requires_grad changed"
    assert_state_dicts_equal(model.state_dict(), before["values"], f"{what} state_dict")
    assert after["modes"] == before["modes"], f"{what}: train/eval flags changed"


def _block_types(model):
    return [type(m) for m in model.modules()
            if isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck, TimmBasicBlock, TimmBottleneck))
            or type(m).__name__ in ("BasicBlock", "Bottleneck")]


class _Tensors(nn.Module):
    """model(x) as one tensor (every output of a dict-returning model, flattened), so that the helpers'
    training step and comparisons apply to detection backbones and segmenters. Each forward starts from
    the same random state, so two models draw the same dropout masks (DeepLab's head)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        torch.manual_seed(0)
        out = self.model(x)
        if isinstance(out, dict):
            return torch.cat([v.flatten(1) for v in out.values()], 1)
        return out


# ---------------------------------------------------------------------------------------------- torchvision

def test_convert_torchvision_resnet_in_place():
    """The root itself converts (the same object, now a fastres.ResNet), an optimizer built before
    conversion still trains it, mixed train/eval flags and frozen parameters survive."""
    model = tv_model("resnet50", num_classes=10).train()
    model.layer1[0].bn2.eval()                      # frozen statistics in one BN
    model.conv1.weight.requires_grad_(False)        # a frozen stem
    original = copy.deepcopy(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = _snapshot(model)
    converted = fastres.convert(model)
    assert converted is model and type(model) is fastres.ResNet
    assert set(_block_types(model)) == {fastres.Bottleneck}
    _assert_kept(model, before, "resnet50")
    assert model.layer1[0].bn2.training is False and model.layer1[0].training is True
    x = randn(*TRAIN_SHAPE, seed=1)
    assert_train_matches(original, model, x, what="converted resnet50")
    # The optimizer built before conversion updates the converted model's parameters.
    model.zero_grad()
    model(x).sum().backward()
    weight = model.layer2[0].conv2.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.layer2[0].conv2.weight, weight)
    assert_eval_matches(original, fastres.convert(copy.deepcopy(original)), shapes=[((1, 3, 37, 45), False)],
                        what="converted resnet50")


def test_convert_blocks_at_any_depth_in_a_user_model():
    """torchvision blocks inside Sequential / ModuleList / ModuleDict of a user model convert; a block
    shared by two parents gets one replacement; a user subclass, a GroupNorm block and a block with a
    replaced activation are left as they are; a torchvision ResNet subclass root keeps its class."""
    torch.manual_seed(0)

    class MyBlock(tv_resnet.BasicBlock):   # the user's own forward: never swapped
        def forward(self, x):
            return super().forward(x) * 0.5

    shared = tv_resnet.BasicBlock(16, 16)
    silu = tv_resnet.BasicBlock(16, 16)
    silu.relu = nn.SiLU()
    gn = tv_resnet.BasicBlock(16, 16, norm_layer=lambda c: nn.GroupNorm(4, c))
    model = nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        body=nn.ModuleList([shared, nn.ModuleDict({"deep": nn.Sequential(tv_resnet.Bottleneck(
            16, 4, downsample=None), shared)}), MyBlock(16, 16), silu, gn]),
    ))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            x = self.inner.stem(x)
            for m in self.inner.body:
                x = m["deep"](x) if isinstance(m, nn.ModuleDict) else m(x)
            return x

    net = randomize_bn_(Net()).eval()
    original = copy.deepcopy(net)
    before = _snapshot(net)
    assert fastres.convert(net) is net
    _assert_kept(net, before, "user model")
    body = net.inner.body
    assert type(body[0]) is fastres.BasicBlock and body[1]["deep"][1] is body[0]
    assert type(body[1]["deep"][0]) is fastres.Bottleneck
    assert type(body[2]) is MyBlock and type(body[3]) is tv_resnet.BasicBlock and type(body[4]) is tv_resnet.BasicBlock
    x = randn(2, 3, 12, 12, seed=2)
    with torch.no_grad():
        assert_rel_close(net(x), original(x), what="user model eval")
    assert_train_matches(original, net, x, fp32_direct=True, what="user model")


def test_convert_faster_rcnn_backbone():
    """fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None): the backbone body (an
    IntermediateLayerGetter) holds fastres Bottlenecks; FPN features eval and one training step as
    torchvision's; the whole detector still runs, with the same detections in float64."""
    torch.manual_seed(0)
    det = detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=64, max_size=96)
    randomize_bn_(det, 2)
    original = copy.deepcopy(det)
    before = _snapshot(det)
    assert fastres.convert(det) is det
    _assert_kept(det, before, "faster r-cnn")
    body = det.backbone.body
    assert type(body).__name__ == "IntermediateLayerGetter"
    assert _block_types(body) and set(_block_types(body)) == {fastres.Bottleneck}
    assert_eval_matches(_Tensors(original.backbone), _Tensors(det.backbone), shapes=[((1, 3, 64, 80), False)],
                        what="FPN features")
    assert_train_matches(_Tensors(original.backbone), _Tensors(det.backbone), randn(*TRAIN_SHAPE, seed=3),
                         what="FPN training step")
    images = [randn(3, 64, 80, seed=4, dtype=torch.float64).abs()]
    with torch.no_grad():
        expected = original.double().eval()(images)[0]
        got = det.double().eval()(images)[0]
    assert set(got) == {"boxes", "scores", "labels"}
    assert_exactly_equal(got["labels"], expected["labels"], "labels")
    for key in ("boxes", "scores"):
        assert_rel_close(got[key], expected[key], 1e-8, f"detections {key}")


def test_convert_frozen_batch_norm_backbone():
    """torchvision detection's pretrained-backbone form: FrozenBatchNorm2d everywhere and the first layers
    frozen. FrozenBN is eval-mode BN in every mode, so the blocks convert and fold it: eval and training
    mode within the model tolerance in fp32 and 1e-10 (eval) / 1e-8 (a training step) in float64."""
    torch.manual_seed(0)
    fpn = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    randomize_bn_(fpn, 3)
    original = copy.deepcopy(fpn)
    before = _snapshot(fpn)
    fastres.convert(fpn)
    _assert_kept(fpn, before, "frozen-BN FPN backbone")
    assert set(_block_types(fpn.body)) == {fastres.Bottleneck}
    assert not fpn.body.layer1[0].conv1.weight.requires_grad and fpn.body.layer2[0].conv1.weight.requires_grad
    x = randn(2, 3, 64, 64, seed=5)
    assert_eval_matches(_Tensors(original), _Tensors(fpn), shapes=[((2, 3, 64, 64), False)], what="frozen BN eval")
    assert_eval_matches(_Tensors(copy.deepcopy(original)).double(), _Tensors(copy.deepcopy(fpn)).double(),
                        shapes=[((2, 3, 64, 64), False)], dtype=torch.float64, what="frozen BN eval float64")
    # Training mode: FrozenBN stays frozen (nothing else is a BatchNorm); only layer2..4 get gradients.
    assert_train_matches(_Tensors(original), _Tensors(fpn), x, fp32_direct=True, what="frozen BN training step")


def test_convert_deeplabv3_dilated():
    """deeplabv3_resnet50 (layer3/layer4 dilated): the backbone's blocks convert; segmentation logits in
    eval, one training step exactly in float64 (BN in training on batch statistics)."""
    torch.manual_seed(0)
    seg = segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5)
    randomize_bn_(seg, 4)
    original = copy.deepcopy(seg)
    before = _snapshot(seg)
    fastres.convert(seg)
    _assert_kept(seg, before, "deeplabv3")
    blocks = [m for m in seg.backbone.modules() if isinstance(m, tv_resnet.Bottleneck)]
    assert blocks and all(type(m) is fastres.Bottleneck for m in blocks)
    assert seg.backbone.layer4[0].conv2.dilation == (2, 2) and seg.backbone.layer4[1].conv2.dilation == (4, 4)
    assert_eval_matches(_Tensors(original), _Tensors(seg), shapes=[((1, 3, 48, 48), False)], what="deeplabv3")
    assert_train_matches(_Tensors(original), _Tensors(seg), randn(2, 3, 48, 48, seed=6), what="deeplabv3")


def test_convert_nothing_to_convert_and_bad_input():
    torch.manual_seed(0)
    plain = randomize_bn_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
    before = _snapshot(plain)
    types = [type(m) for m in plain.modules()]
    x = randn(1, 3, 9, 9, seed=7)
    with torch.no_grad():
        expected = plain(x)
    assert fastres.convert(plain) is plain
    _assert_kept(plain, before, "nothing to convert")
    assert [type(m) for m in plain.modules()] == types
    with torch.no_grad():
        assert_exactly_equal(plain(x), expected, "nothing converted")
    gn = tv_model("resnet18", num_classes=10, norm_layer=lambda c: nn.GroupNorm(4, c)).eval()
    fastres.convert(gn)   # the root converts; its GroupNorm blocks are left as they are
    assert type(gn) is fastres.ResNet and set(_block_types(gn)) == {tv_resnet.BasicBlock}
    block = tv_resnet.BasicBlock(8, 8)
    assert fastres.convert(block) is block and type(block) is fastres.BasicBlock
    assert fastres.convert(fastres.resnet18()) is not None   # a fastres model: nothing to do
    for bad in ("resnet18", None, 3, nn.Linear, [nn.Linear(2, 2)]):
        with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
            fastres.convert(bad)


# ---------------------------------------------------------------------------------------------- timm

timm = pytest.importorskip("timm")   # an optional dependency: everything below skips without it


def _timm_model(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_bn_(timm.create_model(name, pretrained=False, **kwargs), seed + 1)


@pytest.fixture(scope="module", params=["resnet18", "resnet50", "resnext50_32x4d"])
def timm_pair(request):
    """(original timm model, converted copy, snapshot of the copy before conversion)."""
    original = _timm_model(request.param, num_classes=10)
    model = copy.deepcopy(original)
    before = _snapshot(model)
    return request.param, original, fastres.convert(model), before


def test_timm_convert_keeps_everything(timm_pair):
    name, original, model, before = timm_pair
    assert type(model) is type(original)      # timm's ResNet itself is not torchvision's: only its blocks change
    expected = TimmBasicBlock if name == "resnet18" else TimmBottleneck
    assert set(_block_types(model)) == {expected}
    assert all(isinstance(b, FASTRES_BLOCKS) for layer in (model.layer1, model.layer4) for b in layer)
    _assert_kept(model, before, f"timm {name}")


def test_timm_convert_eval(timm_pair):
    name, original, model, _ = timm_pair
    assert_eval_matches(original, model, shapes=[((1, 3, 37, 45), False), ((2, 3, 32, 32), True)], what=f"timm {name}")


def test_timm_convert_training_step(timm_pair):
    name, original, model, _ = timm_pair
    assert_train_matches(original, model, randn(*TRAIN_SHAPE, seed=8), fp32_direct=name == "resnet18",
                         what=f"timm {name}")


def test_timm_variants():
    """resnet-D (avg-pool shortcut) converts (the shortcut runs as its modules); SE, drop-path, DropBlock,
    anti-aliasing, other activations and norms are left as timm's blocks; a hooked block too."""
    from timm.models import resnet as timm_resnet

    small = dict(layers=[1, 1, 1, 1], num_classes=10)

    def build(**kwargs):
        torch.manual_seed(0)
        return randomize_bn_(timm_resnet.ResNet(**{**dict(block=timm_resnet.BasicBlock), **small, **kwargs}), 1)

    converted = build(stem_type="deep", avg_down=True)
    original = copy.deepcopy(converted)
    fastres.convert(converted)
    assert set(_block_types(converted)) == {TimmBasicBlock}
    assert_eval_matches(original, converted, shapes=[((2, 3, 32, 32), False)], what="resnet-D")
    assert_train_matches(original, converted, randn(*TRAIN_SHAPE, seed=9), fp32_direct=True, what="resnet-D")

    left = {
        "se": dict(block_args=dict(attn_layer="se")),
        "drop_path": dict(drop_path_rate=0.1),
        "drop_block": dict(drop_block_rate=0.1),
        "anti-aliasing": dict(aa_layer=timm.layers.BlurPool2d),
        "silu": dict(act_layer=nn.SiLU),
        "groupnorm": dict(norm_layer="groupnorm"),
    }
    for what, kwargs in left.items():
        model = build(**kwargs)
        types = [type(m) for m in model.modules()]
        fastres.convert(model)
        blocks = _block_types(model)
        if what == "drop_block":   # DropBlock only in the last two stages: the first two convert
            assert blocks[:2] == [TimmBasicBlock] * 2 and blocks[2:] == [timm_resnet.BasicBlock] * 2, what
            continue
        if what in ("anti-aliasing", "drop_path"):   # not in the first block: no stride, drop rate 0 there
            assert blocks == [TimmBasicBlock] + [timm_resnet.BasicBlock] * 3, what
            continue
        assert [type(m) for m in model.modules()] == types, what
    hooked = build()
    hooked.layer2[0].register_forward_hook(lambda m, i, o: None)
    fastres.convert(hooked)
    assert type(hooked.layer2[0]) is timm_resnet.BasicBlock and type(hooked.layer3[0]) is TimmBasicBlock
    bare = timm_resnet.Bottleneck(64, 16)
    replacement = fastres.convert(bare)     # a timm block as the root: its replacement is returned
    assert type(replacement) is TimmBottleneck and replacement is not bare
    assert replacement.conv2 is bare.conv2 and list(replacement.state_dict()) == list(bare.state_dict())
    replacement.zero_init_last()            # timm's init_weights(zero_init_last=True) keeps working
    assert not replacement.bn3.weight.any()


def test_timm_converted_model_traces_and_extracts_features(timm_pair):
    """torch.fx and feature extraction of a converted timm model: fused nodes, the eager numbers."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from fastres.models.tracing import fused_block

    name, _, model, _ = timm_pair
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(fused_block) == \
        len([m for m in model.modules() if isinstance(m, FASTRES_BLOCKS)])
    extractor = create_feature_extractor(model, {"layer3": "f"})
    x = randn(1, 3, 32, 32, seed=10)
    captured = {}
    handle = model.layer3.register_forward_hook(lambda m, i, o: captured.setdefault("f", o))
    with torch.no_grad():
        expected = model(x)
        handle.remove()
        assert_rel_close(gm(x), expected, 1e-5, f"traced timm {name}")
        assert_rel_close(extractor(x)["f"], captured["f"], 1e-5, f"timm {name} layer3 features")
