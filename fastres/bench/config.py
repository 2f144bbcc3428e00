"""What to benchmark: the parsers for every list a user can give (CLI flags, FASTRES_BENCH_*
variables) and the quick/full settings the pytest suites read.

Quick mode (small images, one batch, few rounds) is chosen when there is no GPU, or forced
with FASTRES_BENCH_QUICK=1 (FASTRES_BENCH_QUICK=0 forces full sizes even on a CPU).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS: Dict[str, torch.memory_format] = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("infer", "train")
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
          "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
SUITE_MODELS = MODELS[:5]  # the five depths; the CLI takes any of MODELS
COMPARE = ("torchvision", "compile", "compile-max-autotune")
COMPILE_POLICIES = ("all", "smallest", "none")


def parse_list(text: object, what: str, allowed: Sequence[str]) -> List[str]:
    """'a,b' -> ['a', 'b'], each checked against `allowed` (case-insensitive, duplicates dropped)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} must be a comma-separated list of {list(allowed)}; got {text!r}")
    items = []
    for item in (part.strip().lower() for part in text.split(",")):
        if item not in allowed:
            raise ValueError(f"{what}: unknown {item!r}; expected a comma-separated list of {list(allowed)}")
        if item not in items:
            items.append(item)
    return items


def parse_batches(text: object, what: str = "batch") -> List[int]:
    """'1,32,256' -> [1, 32, 256]; every batch a positive integer."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} must be comma-separated positive integers, e.g. 1,32,256; got {text!r}")
    batches = []
    for item in (part.strip() for part in text.split(",")):
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"{what} must be comma-separated positive integers, e.g. 1,32,256; "
                             f"got {item!r} in {text!r}")
        if int(item) not in batches:
            batches.append(int(item))
    return batches


def parse_positive(text: object, what: str, minimum: int = 1) -> int:
    value = str(text).strip()
    if not value.lstrip("-").isdigit() or int(value) < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}; got {text!r}")
    return int(value)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(text: object) -> torch.device:
    name = str(text).strip().lower()
    if name == "auto":
        return default_device()
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {text!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is available here")
    return torch.device(name)


def unrunnable(impl: str, device: torch.device) -> Optional[str]:
    """Why `impl` is not worth timing on `device` at all, or None."""
    if impl == "fastres-triton" and device.type != "cuda":
        return "Triton on a CPU runs in its interpreter (TRITON_INTERPRET=1): a correctness tool, not a speed"
    return None


def _flag(environ: Mapping[str, str], name: str) -> Optional[bool]:
    value = environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be 1 or 0; got {environ[name]!r}")


def _points(device: torch.device, quick: bool, dtypes: Optional[str], layouts: Optional[str]):
    """Every dtype x layout when asked for (or at full size); in quick mode only the baselines'
    points: NCHW fp32, channels_last fp32 and, on a GPU, channels_last bf16 (AMP). On a CPU bf16
    stays out of quick mode (FASTRES_BENCH_DTYPES=fp32,bf16 adds it): oneDNN reports native bf16
    on the 2-core CI machine, yet bf16 blocks measured 10-100x slower than fp32 there."""
    if dtypes or layouts or not quick:
        return tuple((d, l) for d in parse_list(dtypes or "fp32,bf16", "FASTRES_BENCH_DTYPES", list(DTYPES))
                     for l in parse_list(layouts or "nchw,channels_last", "FASTRES_BENCH_LAYOUTS", list(LAYOUTS)))
    gpu = (("bf16", "channels_last"),) if device.type == "cuda" else ()
    return (("fp32", "nchw"), ("fp32", "channels_last")) + gpu


@dataclass(frozen=True)
class Settings:
    """Everything a pytest benchmark run varies; see `from_environment` for the defaults."""
    device: torch.device
    quick: bool
    size: int
    batches: Tuple[int, ...]
    points: Tuple[Tuple[str, str], ...]  # the (dtype, layout) pairs every case is timed at
    models: Tuple[str, ...]
    warmup: int
    rounds: int
    compile: str
    max_autotune: bool

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        """Defaults, overridden by FASTRES_BENCH_{QUICK,DEVICE,SIZE,BATCHES,DTYPES,LAYOUTS,MODELS,
        WARMUP,ROUNDS,COMPILE,MAX_AUTOTUNE}."""
        def get(name: str) -> Optional[str]:
            value = environ.get(f"FASTRES_BENCH_{name}", "").strip()
            return value or None

        device = parse_device(get("DEVICE") or "auto")
        quick = _flag(environ, "FASTRES_BENCH_QUICK")
        quick = device.type != "cuda" if quick is None else quick
        if quick:
            # Small enough for `pytest benchmarks/` in a few minutes on two CPU cores, large enough
            # that every stage still runs (layer4 at 1x1; training BN sees batch x 1 x 1 = 2 values).
            defaults = dict(size=32, batches="2", warmup=1, rounds=3, compile="smallest")
        else:
            defaults = dict(size=224, batches="1,32,256", warmup=10, rounds=30, compile="all")
        compile_policy = (get("COMPILE") or defaults["compile"]).lower()
        if compile_policy not in COMPILE_POLICIES:
            raise ValueError(f"FASTRES_BENCH_COMPILE must be one of {list(COMPILE_POLICIES)}; got {compile_policy!r}")
        return cls(
            device=device,
            quick=quick,
            size=parse_positive(get("SIZE") or defaults["size"], "FASTRES_BENCH_SIZE", minimum=32),
            batches=tuple(parse_batches(get("BATCHES") or defaults["batches"], "FASTRES_BENCH_BATCHES")),
            points=_points(device, quick, get("DTYPES"), get("LAYOUTS")),
            models=tuple(parse_list(get("MODELS") or ",".join(SUITE_MODELS), "FASTRES_BENCH_MODELS", list(MODELS))),
            warmup=parse_positive(get("WARMUP") or defaults["warmup"], "FASTRES_BENCH_WARMUP", minimum=0),
            rounds=parse_positive(get("ROUNDS") or defaults["rounds"], "FASTRES_BENCH_ROUNDS"),
            compile=compile_policy,
            max_autotune=bool(_flag(environ, "FASTRES_BENCH_MAX_AUTOTUNE")),
        )

    def implementations(self, baseline: str) -> List[str]:
        """What each case is timed with: the eager baseline, torch.compile of it, every fastres backend."""
        import fastres

        compiled = ["compile"] + (["compile-max-autotune"] if self.max_autotune else [])
        return [baseline] + compiled + [f"fastres-{name}" for name in fastres.available_backends()]

    @property
    def amp_dtype(self) -> str:
        """The dtype of the "channels_last with AMP" baseline in this run."""
        return "bf16" if ("bf16", "channels_last") in self.points else "fp32"

    def smallest(self, dtype: str, layout: str) -> bool:
        """Whether (dtype, layout) is the one point that gets torch.compile in quick mode, with the
        smallest model or shape of a level (each compile costs tens of seconds on a CPU)."""
        point = ("fp32", "channels_last") if ("fp32", "channels_last") in self.points else self.points[0]
        return (dtype, layout) == point

    def skip_reason(self, impl: str, smallest: bool) -> Optional[str]:
        """None when `impl` should be timed for this case, else why not (a pytest skip reason)."""
        if impl.startswith("compile"):
            if self.compile == "none":
                return "torch.compile disabled (FASTRES_BENCH_COMPILE=none)"
            if self.compile == "smallest" and not smallest:
                return ("quick mode: torch.compile only for the smallest case of each level, compiling takes "
                        "~20-50 s per graph on a CPU (FASTRES_BENCH_COMPILE=all to compile everything)")
        return unrunnable(impl, self.device)


@functools.lru_cache(maxsize=None)
def current_settings() -> Settings:
    """The settings of this process (the pytest suites and their conftest read the same ones)."""
    return Settings.from_environment()
