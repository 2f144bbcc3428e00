"""Builds fastres and its compiled extension fastres._C (C++ CPU kernels, CUDA kernels when possible).

Environment:
  FASTRES_SKIP_EXT=1     build no extension (fastres then runs on the "torch" backend)
  FASTRES_SKIP_CUDA=1    build the CPU kernels only
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default: the visible GPUs, else "8.0;9.0"; no GPU is
                         needed to compile)
  MAX_JOBS               parallel compile jobs (ninja)
Install with `pip install --no-build-isolation -e .` after torch: the build imports torch.
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _cudart_dirs(cuda_home):
    """Where libcudart.so is: torch looks only in CUDA_HOME/lib64, which misses layouts such as
    nvcc in /usr/local/bin with the libraries in /usr/local/cuda-X.Y/lib."""
    candidates = [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
    candidates += sorted(glob.glob("/usr/local/cuda*/lib64")) + sorted(glob.glob("/usr/local/cuda*/lib"))
    return [d for d in candidates if os.path.exists(os.path.join(d, "libcudart.so"))][:1]


def _extensions():
    if os.environ.get("FASTRES_SKIP_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastres: torch is not importable at build time; building without fastres._C "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}

    cpp_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    use_cuda = (bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                and os.environ.get("FASTRES_SKIP_CUDA") != "1")
    # -fopenmp: at::parallel_for is inline OpenMP code; without the flag the CPU kernels run on one thread.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    define_macros = []
    if use_cuda:
        # Compiling needs no GPU; without one torch cannot guess the architectures (with one,
        # torch builds for the GPUs it sees).
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define_macros.append(("FASTRES_WITH_CUDA", None))
        extension = cpp_extension.CUDAExtension(
            "fastres._C", cpp_sources + cuda_sources, define_macros=define_macros,
            library_dirs=_cudart_dirs(cpp_extension.CUDA_HOME), extra_link_args=link_flags,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]})
    else:
        extension = cpp_extension.CppExtension("fastres._C", cpp_sources, define_macros=define_macros,
                                               extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
