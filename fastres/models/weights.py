"""Weights for the zoo's constructors: torchvision's enums and names, torchvision's legacy keywords
(`pretrained=True`, positional arguments) and a one-line error where the download fails."""
from __future__ import annotations

import functools
import http.client
import os
import urllib.error
import urllib.parse
import warnings
from typing import Any, Callable

import torch
from torchvision.models import WeightsEnum


class WeightsDownloadError(urllib.error.URLError):
    """Pretrained weights that could not be fetched (no network, a proxy, an unwritable cache). A
    URLError (an OSError), as torch's own download raises, with one line that names the remedy."""

    def __init__(self, message: str, reason: object = None) -> None:
        super().__init__(reason if reason is not None else message)
        self.args = (message,)
        self.message = message

    def __str__(self) -> str:
        return self.message


def verify_weights(enum_cls, weights):
    """None, or the member of `enum_cls` that `weights` (a member or its name, "DEFAULT" included) names."""
    if weights is None:
        return None
    if isinstance(weights, str):
        try:
            return enum_cls.verify(weights)
        except (KeyError, ValueError):
            names = ["DEFAULT"] + [w.name for w in enum_cls]
            raise ValueError(f"weights must be None, a {enum_cls.__name__} or one of the names {names}; "
                             f"got {weights!r}") from None
    if not isinstance(weights, enum_cls):
        raise TypeError(f"weights must be None, a {enum_cls.__name__} or its name; got {weights!r}")
    return weights


def _checkpoint_path(weights: WeightsEnum) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(weights.url).path))


def load_weights(weights: WeightsEnum, progress: bool) -> dict:
    """weights.get_state_dict() (torch.hub's cache, else a download); a failed download is one
    WeightsDownloadError line instead of urllib's traceback."""
    try:
        return weights.get_state_dict(progress=progress, check_hash=True)
    except (OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        path = _checkpoint_path(weights)
        message = (f"could not download the {weights} weights from {weights.url} ({type(error).__name__}: {reason}); "
                   f"without network access build the model with weights=None and load a local state_dict "
                   f"(model.load_state_dict(torch.load(path))), or put the file at {path} "
                   f"(torch.hub's cache: $TORCH_HOME/hub/checkpoints)")
        raise WeightsDownloadError(message, reason) from None


def _positional_names(names) -> str:
    quoted = [f"'{name}'" for name in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def legacy_interface(default: WeightsEnum) -> Callable:
    """torchvision's `handle_legacy_interface(weights=("pretrained", default))` for a constructor
    `fn(*, weights=None, progress=True, **kwargs)`, with torchvision 0.29's behaviour and warnings:

    - `weights` and `progress` may be passed positionally (a deprecation warning names them);
    - `pretrained=True` (or a positional/`weights=` value that is not a weights enum, a name or None, e.g.
      `True`) means `weights=default`, `pretrained=False` means `weights=None`, each with torchvision's
      deprecation warnings;
    - `pretrained` beside `weights=` (an enum, a name or None) reaches the constructor, which rejects it.
    """
    def decorate(builder: Callable) -> Callable:
        @functools.wraps(builder)
        def wrapper(*args: Any, **kwargs: Any):
            if args:
                names = ("weights", "progress")
                if len(args) > len(names):
                    raise TypeError(f"{builder.__name__}() takes at most {len(names)} positional arguments "
                                    f"(weights, progress); got {len(args)}")
                positional = dict(zip(names, args))
                warnings.warn(f"Using {_positional_names(positional)} as positional parameter(s) is deprecated since "
                              f"0.13 and may be removed in the future. Please use keyword parameter(s) instead.",
                              stacklevel=2)
                for name in positional:
                    if name in kwargs:
                        raise TypeError(f"{builder.__name__}() got multiple values for argument '{name}'")
                kwargs.update(positional)
            _resolve_legacy_weights(kwargs, default)
            return builder(**kwargs)

        return wrapper

    return decorate


def _resolve_legacy_weights(kwargs: dict, default: WeightsEnum) -> None:
    missing = object()
    weights = kwargs.get("weights", missing)
    if ("weights" not in kwargs and "pretrained" not in kwargs) or weights is None \
            or isinstance(weights, WeightsEnum) or (isinstance(weights, str) and weights != "legacy"):
        return  # the current interface (or nothing to resolve)
    from_weights = weights is not missing  # e.g. weights=True, or resnet50(True)
    pretrained = kwargs.pop("weights") if from_weights else kwargs["pretrained"]
    kwargs.pop("pretrained", None)
    resolved = default if pretrained else None
    if not from_weights:
        warnings.warn("The parameter 'pretrained' is deprecated since 0.13 and may be removed in the future, "
                      "please use 'weights' instead.", stacklevel=3)
    message = (f"Arguments other than a weight enum or `None` for 'weights' are deprecated since 0.13 and may be "
               f"removed in the future. The current behavior is equivalent to passing `weights={resolved}`.")
    if pretrained:
        message += f" You can also use `weights={type(resolved).__name__}.DEFAULT` to get the most up-to-date weights."
    warnings.warn(message, stacklevel=3)   # at the user's call
    kwargs["weights"] = resolved
