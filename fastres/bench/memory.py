"""Peak memory of one call. On a GPU: torch.cuda.max_memory_allocated over the call (weights,
inputs and optimizer state included, as a user sees it). On a CPU there is no allocator
high-water mark to reset, and max-RSS only grows, so the figure is reported as n/a."""
from __future__ import annotations

from typing import Callable, Optional

import torch

CPU_NOTE = "n/a on CPU (no resettable allocator peak)"


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated on `device` while `fn` runs (after a reset); None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def format_memory(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2 ** 20:.0f} MiB"


# ------------------------------------------------------------------ saved activations, without a GPU

def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward during model(x), parameters and
    buffers excluded: the activation memory a training step holds at the end of its forward. Counted
    through saved-tensor hooks, so it works on fake tensors (no memory, no GPU) and is exact for what
    autograd saves; a GPU's peak (peak_memory_bytes) adds the weights, gradients and transient
    workspaces."""
    held = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in held:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def saved_activations_table(model_name: str = "resnet50", batch: int = 256, image: int = 224,
                            dtype: torch.dtype = torch.bfloat16) -> list:
    """[(what, MiB)] for one training forward on fake CUDA tensors: torchvision eager, fastres's phase-A
    blocks (backend "torch") and the NormConv chain (backend "triton", its operators' fake kernels)."""
    import torchvision
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastres
    if not fastres.ops.registry.triton_status()[0]:
        raise RuntimeError("the NormConv chain needs the Triton backend: set TRITON_INTERPRET=1 on a machine "
                           "without a GPU")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters made in dtype (fake parameters cannot be converted)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
            x = torch.empty(batch, 3, image, image, dtype=dtype).contiguous(memory_format=torch.channels_last)
            tv = getattr(torchvision.models, model_name)().train()
            fr = getattr(fastres, model_name)().train()
            rows = [("torchvision eager", saved_activation_bytes(tv, x))]
            for label, backend in (("fastres phase A (backend torch)", "torch"),
                                   ("fastres NormConv chain (backend triton)", "triton")):
                with fastres.use_backend(backend):
                    rows.append((label, saved_activation_bytes(fr, x)))
    finally:
        torch.set_default_dtype(previous)
    return [(what, nbytes / 2 ** 20) for what, nbytes in rows]


def main(argv=None) -> int:
    """python -m fastres.bench.memory [--model resnet50] [--batch 256] [--dtype bf16]: the saved-activation
    table (fake tensors: runs anywhere, in seconds; TRITON_INTERPRET=1 where there is no GPU)."""
    import argparse
    p = argparse.ArgumentParser(description="activation memory saved for the backward, per implementation")
    p.add_argument("--model", default="resnet50,resnet18")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    a = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    print("| model | batch | dtype | implementation | saved for backward (MiB) | vs torchvision eager |")
    print("|---|---|---|---|---|---|")
    for model in a.model.split(","):
        rows = saved_activations_table(model, a.batch, a.image, dtype)
        for what, mib in rows:
            print(f"| {model} | {a.batch} | {a.dtype} | {what} | {mib:.0f} | {mib / rows[0][1] - 1:+.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
