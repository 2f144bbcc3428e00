"""Fused building blocks over real torch.nn submodules, and the eval-time folding cache."""
from .folding import clear_fold_cache, folded_conv_bn
from .fused import (batch_norm_act, bn_prologue, cheap_to_recompute, conv_bn_act, conv_bn_stats, fusable_pair,
                    fusable_relu, memory_format_of, norm_conv_chain_applies, recomputed, uses_running_stats)

__all__ = ["batch_norm_act", "bn_prologue", "cheap_to_recompute", "clear_fold_cache", "conv_bn_act", "conv_bn_stats",
           "folded_conv_bn", "fusable_pair", "fusable_relu", "memory_format_of", "norm_conv_chain_applies",
           "recomputed", "uses_running_stats"]
