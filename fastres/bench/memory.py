"""Peak memory of one call. On a GPU: torch.cuda.max_memory_allocated over the call (weights,
inputs and optimizer state included, as a user sees it). On a CPU there is no allocator
high-water mark to reset, and max-RSS only grows, so the figure is reported as n/a."""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode

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


def forward_memory_bytes(forward: Callable[[], object], device: torch.device) -> Optional[tuple]:
    """(peak bytes during forward(), bytes still held after it while its result lives) on `device`: for
    a training step's forward returning the loss, the activations it keeps for the backward. None on
    a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = forward()
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - before
    del result
    return torch.cuda.max_memory_allocated(device), held


def format_memory(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2 ** 20:.0f} MiB"


# ------------------------------------------------------------------ counted without a GPU

def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward during model(x), parameters and
    buffers excluded: the activation memory a training step holds at the end of its forward. Counted
    through saved-tensor hooks, so it works on fake tensors (no memory, no GPU) and is exact for what
    autograd saves; tensors a recomputed segment keeps for its backward (torch.utils.checkpoint) are held
    outside the hooks and are not seen here: step_peak_bytes counts those too."""
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


class LiveBytes(TorchDispatchMode):
    """The high-water mark of live tensor storage over what runs inside it: every storage an operator
    returns counts from its creation until it is freed (a weak reference on the storage), the storages
    given to `hold` count from the start. Works on fake tensors, so a GPU-sized training step is counted
    on any machine. What it cannot see: memory a kernel allocates and frees inside one operator (cuDNN
    workspaces, split-K partials) and the caching allocator's rounding and fragmentation."""

    def __init__(self, hold=()):
        super().__init__()
        self.live = self.peak = 0
        self._refs = {}
        for t in hold:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._refs:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._free(key, nbytes))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, key, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def step_peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak live tensor bytes of one training step, forward and backward (LiveBytes): the parameters,
    buffers and input from the start, then every activation, saved tensor, transient and gradient
    while it lives. The counted stand-in for torch.cuda.max_memory_allocated where there is no GPU."""
    model.zero_grad(set_to_none=True)
    with LiveBytes(hold=(*model.parameters(), *model.buffers(), x)) as live:
        model(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return live.peak


def saved_activations_table(model_name: str = "resnet50", batch: int = 256, image: int = 224,
                            dtype: torch.dtype = torch.bfloat16, autocast: bool = False) -> list:
    """[(what, saved MiB, step peak MiB)] for one training step on fake tensors: torchvision eager,
    fastres's phase-A blocks (backend "torch") and the NormConv chain (backend "triton", its operators'
    fake kernels). Parameters and input in dtype; autocast=True: in float32, the step under
    torch.autocast(dtype) (as the GPU check trains)."""
    import torchvision
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastres
    if not fastres.ops.registry.triton_status()[0]:
        raise RuntimeError("the NormConv chain needs the Triton backend: set TRITON_INTERPRET=1 on a machine "
                           "without a GPU")
    def count(device: str, measure) -> list:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.device(device):
            x = torch.empty(batch, 3, image, image).contiguous(memory_format=torch.channels_last)
            tv = getattr(torchvision.models, model_name)().train()
            fr = getattr(fastres, model_name)().train()
            counts = []
            for model, backend in ((tv, "torch"), (fr, "torch"), (fr, "triton")):
                with fastres.use_backend(backend), torch.autocast(device, dtype=dtype, enabled=autocast):
                    counts.append(measure(model, x))
        return counts

    previous = torch.get_default_dtype()
    # parameters and input made in dtype (fake parameters cannot be converted); float32 under autocast
    torch.set_default_dtype(torch.float32 if autocast else dtype)
    try:
        # autocast needs a real device type: CUDA's is off on a machine without one, so CPU's is used
        saved = count("cpu" if autocast else "cuda", saved_activation_bytes)
        # The backward runs on fake CPU tensors: autograd's engine asks for a CUDA context for CUDA
        # tensors, fake or not. What a step allocates does not depend on the device (the Triton path runs
        # on CPU tensors under TRITON_INTERPRET=1, the same operators and fakes).
        peaks = count("cpu", step_peak_bytes)
    finally:
        torch.set_default_dtype(previous)
    labels = ("torchvision eager", "fastres phase A (backend torch)", "fastres NormConv chain (backend triton)")
    rows = list(zip(labels, saved, peaks))
    return [(what, saved / 2 ** 20, peak / 2 ** 20) for what, saved, peak in rows]


def main(argv=None) -> int:
    """python -m fastres.bench.memory [--model resnet50] [--batch 256] [--dtype bf16]: the saved-activation
    table (fake tensors: runs anywhere, in seconds; TRITON_INTERPRET=1 where there is no GPU)."""
    import argparse
    p = argparse.ArgumentParser(description="activation memory saved for the backward, per implementation")
    p.add_argument("--model", default="resnet50,resnet18")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--dtype", default="bf16,bf16-autocast",
                   help="comma-separated: bf16, fp16, fp32 (parameters and input in it) or bf16-autocast, "
                        "fp16-autocast (float32 parameters, the step under torch.autocast)")
    a = p.parse_args(argv)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    print("| model | batch | dtype | implementation | saved for backward (MiB) | vs torchvision | "
          "step peak, counted (MiB) | vs torchvision |")
    print("|---|---|---|---|---|---|---|---|")
    for model in a.model.split(","):
        for dtype_name in a.dtype.split(","):
            base, _, autocast = dtype_name.partition("-")
            if base not in dtypes or autocast not in ("", "autocast"):
                p.error(f"--dtype: expected bf16, fp16, fp32, bf16-autocast or fp16-autocast; got {dtype_name!r}")
            rows = saved_activations_table(model, a.batch, a.image, dtypes[base], autocast=bool(autocast))
            for what, saved, peak in rows:
                print(f"| {model} | {a.batch} | {dtype_name} | {what} | {saved:.0f} | {saved / rows[0][1] - 1:+.1%} | "
                      f"{peak:.0f} | {peak / rows[0][2] - 1:+.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
