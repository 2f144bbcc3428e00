"""What a benchmark record must say about where it ran."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

import fastres


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
        return out.strip().splitlines()[0] if out.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        # the vector instruction set torch's CPU kernels (and fastres's Winograd kernel) run on:
        # "AMD EPYC" alone does not tell a Zen 3 (AVX2) from a Zen 4 (AVX512)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastres": fastres.__version__,
        "fastres_commit": _git_commit(),
        "backend": fastres.get_backend(),
        "extension_loaded": fastres.extension_loaded(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if device.type == "cuda":
        info["driver"] = _nvidia_driver()
        info["cudnn"] = torch.backends.cudnn.version()
        # switched off at run time (FASTRES_CUDNN_GRAPHS=0, e.g. after the GPU check's probe crashed)
        info["cudnn_graphs_enabled"] = os.environ.get("FASTRES_CUDNN_GRAPHS") != "0"
    return info
