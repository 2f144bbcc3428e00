"""fastres: fused GPU kernels for ResNets, a drop-in replacement for torchvision's ResNet zoo.

    model = fastres.resnet50(weights="IMAGENET1K_V2").eval()   # same keys and numbers as torchvision
    model = fastres.from_torchvision(tv_model)                 # or convert an existing model (a copy)
    detector = fastres.convert(detector)                       # every ResNet / block inside, in place
"""
__version__ = "0.1.0"

from . import ops
from ._extension import build_info, extension_loaded
from .models.resnet import (BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152,
                            resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2)
from .models.convert import convert, from_torchvision
from .models.tracing import create_feature_extractor, get_graph_node_names
from .models.weights import WeightsDownloadError
from .models.cifar import (cifar_resnet20, cifar_resnet32, cifar_resnet44, cifar_resnet56, cifar_resnet110,
                           cifar_resnet1202)
from .models.preact import (resnet_v2_18, resnet_v2_34, resnet_v2_50, resnet_v2_101, resnet_v2_152,
                            resnet_v2_200)
from .models.counting import count_macs, count_params
from .cuda_graphs import GraphedInference, cudagraph
from .ops.tuner import tuning_report
from .ops.backend import _default_from_environment, available_backends, get_backend, set_backend, use_backend

_default_from_environment()

__all__ = [
    "BasicBlock", "Bottleneck", "ResNet", "convert", "from_torchvision", "create_feature_extractor",
    "get_graph_node_names", "WeightsDownloadError",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "available_backends", "tuning_report", "get_backend", "set_backend", "use_backend", "extension_loaded",
    "build_info", "ops",
    "count_params", "count_macs", "cudagraph", "GraphedInference",
    "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110", "cifar_resnet1202",
    "resnet_v2_18", "resnet_v2_34", "resnet_v2_50", "resnet_v2_101", "resnet_v2_152", "resnet_v2_200",
]
