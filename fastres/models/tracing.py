"""fastres models under torch.fx, TorchScript and torchvision's feature extraction.

- torch.fx (`symbolic_trace`, torchvision's `create_feature_extractor` / `get_graph_node_names`):
  each fastres block is one graph node, `fused_block(block, x)`, and the stem's fused conv+BN+ReLU is
  one `conv_bn_act(conv1, bn1, x)` node; both are FX leaf functions (`torch.fx.wrap`, registered by
  the modules that call them). They take the modules themselves (`get_attr` nodes), so when the graph
  runs, the node runs the block's eager forward: the fused kernels, the block's mode at that moment
  (train or eval, so one graph serves both), hooks on its submodules honoured. The model's input
  checks and layout are a leaf too (`model_input`), run on the real input when the graph runs.
- TorchScript (`torch.jit.script`, `torch.jit.trace`): the forwards take a plain path of torch
  modules and ops (torchvision's own arithmetic), since the fused path's Python dispatch and caches
  cannot be compiled or recorded; see the README.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.fx import Proxy


def fused_block(block: nn.Module, x: Tensor) -> Tensor:
    """One fastres block's forward as one FX graph node (an FX leaf function): at run time, the
    block's eager (fused) forward on the real tensor."""
    return block.forward(x)


def traced_root_is(module: nn.Module, proxy: Any) -> bool:
    """Whether `module` is the root being traced (a leaf function cannot take the root itself as an
    argument: it has no attribute path in the graph)."""
    return getattr(getattr(proxy, "tracer", None), "root", None) is module


def traced_block(block: nn.Module, x: Any) -> Any:
    """A block's forward under torch.fx (x a Proxy): one fused graph node, or, when the block itself is
    the traced root, its plain forward module by module."""
    return block._plain_forward(x) if traced_root_is(block, x) else fused_block(block, x)


torch.fx.wrap("fused_block")  # the leaf traced_block emits


def unfused_forward(block: nn.Module, x: Any, fusable: bool) -> Optional[Any]:
    """What a block's forward runs instead of its fused path, or None: its plain forward under
    jit.trace or where the fused path cannot honour the block (`fusable` False); one graph node under
    torch.fx. (TorchScript never gets here: each forward returns its plain path first.)"""
    if torch.jit.is_tracing() or not fusable:
        return block._plain_forward(x)
    if isinstance(x, Proxy):
        return traced_block(block, x)
    return None


@contextlib.contextmanager
def keep_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit, exception or not."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def create_feature_extractor(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """torchvision's `create_feature_extractor` (same arguments), except that the model keeps the
    train/eval flag of each of its modules, also when it raises (torchvision's puts the model in train
    mode while it traces, and leaves it there if it fails; on success it sets one mode for all modules)."""
    from torchvision.models.feature_extraction import create_feature_extractor as _create

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    with keep_modes(model):
        extractor = _create(model, *args, **kwargs)
    return extractor


def get_graph_node_names(model: nn.Module, *args: Any, **kwargs: Any):
    """torchvision's `get_graph_node_names` (same arguments and result), except that the model keeps the
    train/eval flag of each of its modules, also when it raises."""
    from torchvision.models.feature_extraction import get_graph_node_names as _names

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    with keep_modes(model):
        return _names(model, *args, **kwargs)
