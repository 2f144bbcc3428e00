"""Fused building blocks over real torch.nn submodules, and the eval-time folding cache."""
from .folding import clear_fold_cache, folded_conv_bn
from .fused import (batch_norm_act, conv_bn_act, fusable_pair, fusable_relu, memory_format_of,
                    uses_running_stats)

__all__ = ["batch_norm_act", "clear_fold_cache", "conv_bn_act", "folded_conv_bn", "fusable_pair",
           "fusable_relu", "memory_format_of", "uses_running_stats"]
