"""torchvision's legacy constructor interface (`pretrained=`, positional arguments) with torchvision
0.29's semantics and warnings, and weights that cannot be downloaded: one clear error, never the
network (downloads are monkeypatched; TORCH_HOME is a fresh temporary directory)."""
from __future__ import annotations

import os
import pickle
import urllib.error
import warnings

import pytest
import torch
import torchvision.models as tvm

import fastres
from helpers import CONSTRUCTORS, assert_state_dicts_equal, tv_model


def _fake_weights(monkeypatch, name="resnet18"):
    """Every weights enum's get_state_dict returns a randomized torchvision state_dict of `name`;
    the calls are recorded (the enum member and the keyword arguments)."""
    sd = tv_model(name, seed=5).state_dict()
    calls = []

    def get_state_dict(self, *args, **kwargs):
        calls.append((self, kwargs))
        return {k: v.clone() for k, v in sd.items()}

    monkeypatch.setattr(tvm.WeightsEnum, "get_state_dict", get_state_dict)
    return sd, calls


def _build(builder, args, kwargs):
    """(model or the exception, [(category, message) of each warning]); random weights from seed 0."""
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = builder(*args, **kwargs)
        except Exception as error:  # compared with torchvision's below
            result = error
    return result, [(w.category, str(w.message)) for w in caught]


LEGACY_CALLS = [
    ("pretrained=True", (), dict(pretrained=True)),
    ("pretrained=False", (), dict(pretrained=False)),
    ("positional True", (True,), {}),
    ("positional False", (False,), {}),
    ("positional weights and progress", (True, False), {}),
    ("weights=True", (), dict(weights=True)),
    ("weights='legacy'", (), dict(weights="legacy")),
    ("pretrained and weights", (), dict(pretrained=True, weights="DEFAULT")),
    ("pretrained and weights=None", (), dict(pretrained=False, weights=None)),
    ("pretrained and num_classes", (), dict(pretrained=True, num_classes=10)),
    ("pretrained=False and num_classes", (), dict(pretrained=False, num_classes=10)),
]


@pytest.mark.parametrize("case", LEGACY_CALLS, ids=[c[0] for c in LEGACY_CALLS])
def test_legacy_interface_is_torchvisions(monkeypatch, case):
    """The same call to fastres.resnet18 and torchvision's resnet18: the same weights requested, the same
    warnings (category and text), the same error type, the same state_dict."""
    _, args, kwargs = case
    _, calls = _fake_weights(monkeypatch)
    expected, expected_warnings = _build(tvm.resnet18, args, dict(kwargs))
    tv_calls = list(calls)
    calls.clear()
    got, got_warnings = _build(fastres.resnet18, args, dict(kwargs))
    assert got_warnings == expected_warnings
    assert [(w, k) for w, k in calls] == [(w, k) for w, k in tv_calls]
    if isinstance(expected, Exception):
        assert type(got) is type(expected), f"fastres gave {got!r}, torchvision {expected!r}"
        return
    assert isinstance(got, fastres.ResNet), got
    assert_state_dicts_equal(got.state_dict(), expected.state_dict())


def test_pretrained_true_is_imagenet1k_v1(monkeypatch):
    """resnet50(pretrained=True) loads IMAGENET1K_V1 (not DEFAULT, which is V2), with a deprecation warning;
    pretrained=False builds the random model."""
    sd, calls = _fake_weights(monkeypatch, "resnet50")
    with pytest.warns(UserWarning) as caught:
        model = fastres.resnet50(pretrained=True)
    assert [w.filename for w in caught] == [__file__] * 2     # both point at the caller
    assert "'pretrained' is deprecated" in str(caught[0].message)
    assert "equivalent to passing `weights=ResNet50_Weights.IMAGENET1K_V1`" in str(caught[1].message)
    assert calls == [(tvm.ResNet50_Weights.IMAGENET1K_V1, dict(progress=True, check_hash=True))]
    assert_state_dicts_equal(model.state_dict(), sd)
    with pytest.warns(UserWarning) as caught:
        model = fastres.resnet50(pretrained=False, num_classes=10)
    assert "equivalent to passing `weights=None`" in str(caught[-1].message)
    assert len(calls) == 1 and model.fc.out_features == 10


def test_every_constructor_has_the_legacy_interface(monkeypatch):
    """Each constructor maps pretrained=True to its own enum's IMAGENET1K_V1 (recorded where the weights are
    checked, before any model is built, then stopped there)."""
    import fastres.models.resnet as fr_resnet

    requested = []

    def verify(enum_cls, weights):
        requested.append(weights)
        raise RuntimeError("stop here")

    monkeypatch.setattr(fr_resnet, "verify_weights", verify)
    for name in CONSTRUCTORS:
        with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="stop here"):
            getattr(fastres, name)(pretrained=True)
        assert requested[-1] is tvm.get_model_weights(name).IMAGENET1K_V1, name
        with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="stop here"):
            getattr(fastres, name)(pretrained=False)
        assert requested[-1] is None, name
    with pytest.raises(TypeError):
        fastres.resnet18(True, True, 3)       # more positionals than (weights, progress)
    with pytest.warns(UserWarning, match="positional"), pytest.raises(TypeError):
        fastres.resnet18(None, weights=None)  # the same argument twice


# ------------------------------------------------------------------------ offline: the download fails

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: torch.hub's download raises what urllib raises without DNS; an empty TORCH_HOME."""
    attempts = []

    def no_network(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path, attempts


@pytest.mark.parametrize("call", [dict(weights="DEFAULT"), dict(weights=tvm.ResNet18_Weights.IMAGENET1K_V1),
                                  dict(pretrained=True)])
def test_offline_is_one_clear_error(offline, call):
    torch_home, attempts = offline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(fastres.WeightsDownloadError) as info:
            fastres.resnet18(**call)
    error = info.value
    assert attempts == [tvm.ResNet18_Weights.IMAGENET1K_V1.url]
    assert isinstance(error, urllib.error.URLError) and isinstance(error, OSError)   # what torch raises
    message = str(error)
    assert "\n" not in message
    assert "Temporary failure in name resolution" in message
    assert "weights=None" in message and "load_state_dict" in message
    cache = os.path.join(str(torch_home), "hub", "checkpoints", "resnet18-f37072fd.pth")
    assert cache in message
    assert error.__cause__ is None and error.__suppress_context__   # no chained urllib traceback
    assert str(pickle.loads(pickle.dumps(error))) == message


def test_offline_with_the_file_in_the_cache(offline):
    """The remedy the error names: the weights file in TORCH_HOME's cache loads without network."""
    torch_home, attempts = offline
    sd = tv_model("resnet18", seed=9).state_dict()
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(sd, checkpoints / os.path.basename(tvm.ResNet18_Weights.IMAGENET1K_V1.url))
    model = fastres.resnet18(weights="IMAGENET1K_V1")
    assert not attempts
    assert_state_dicts_equal(model.state_dict(), sd)


def test_other_load_errors_are_torchs(monkeypatch):
    """Only failed downloads are rewritten; e.g. a corrupt file's error is torch's own."""
    def corrupt(self, *args, **kwargs):
        raise RuntimeError("PytorchStreamReader failed reading zip archive")

    monkeypatch.setattr(tvm.WeightsEnum, "get_state_dict", corrupt)
    with pytest.raises(RuntimeError, match="PytorchStreamReader"):
        fastres.resnet18(weights="DEFAULT")
