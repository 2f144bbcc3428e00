"""Builds fastres and its compiled extension fastres._C (C++ CPU kernels, CUDA kernels when possible).

Environment:
  FASTRES_SKIP_EXT=1     build no extension (fastres then runs on the "torch" backend)
  FASTRES_SKIP_CUDA=1    build the CPU kernels only
  FASTRES_SKIP_CUDNN=1   build no cuDNN graphs (csrc/cuda/cudnn_graphs.cpp) even where the headers are found
  CUDNN_FRONTEND_INCLUDE directory holding cudnn_frontend.h (default: the nvidia-cudnn-frontend wheel's)
  CUDNN_INCLUDE          directory holding cudnn.h (default: the nvidia-cudnn-cu* wheel's, then CUDA_HOME)
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default: the visible GPUs, else "8.0;9.0"; no GPU is
                         needed to compile)
  MAX_JOBS               parallel compile jobs (ninja)
Install with `pip install --no-build-isolation -e .` after torch: the build imports torch.
"""
import glob
import os
import re
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


def _nvrtc_library(cuda_home):
    """(directory, file name) of libnvrtc, which cudnn_frontend calls: the nvidia wheel torch loads
    first, else the CUDA install's. torch >= 2.12 happens to load it globally at import, torch 2.11 does
    not ("undefined symbol: nvrtcGetProgramLogSize" at import otherwise)."""
    candidates = [p for d in _site_dirs()
                  for p in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so*")))]
    candidates += [p for d in _cudart_dirs(cuda_home) for p in sorted(glob.glob(os.path.join(d, "libnvrtc.so*")))]
    candidates = [p for p in candidates if re.fullmatch(r"libnvrtc\.so(\.\d+)*", os.path.basename(p))]
    return (os.path.dirname(candidates[0]), os.path.basename(candidates[0])) if candidates else None


def _cuda_include_dirs(cuda_home):
    """Where cuda_runtime_api.h and nvrtc.h are, for the host-compiled (c++) TU that includes
    cudnn_frontend: nvcc finds its headers itself, torch adds only CUDA_HOME/include (which misses
    nvcc-in-/usr/local/bin layouts), and a minimal CUDA install may lack nvrtc.h, which torch's
    nvidia-cuda wheels ship."""
    candidates = [os.path.join(cuda_home, "include")] + sorted(glob.glob("/usr/local/cuda*/include"))
    candidates += [p for d in _site_dirs() for p in sorted(glob.glob(os.path.join(d, "nvidia", "*", "include")))]
    dirs = []
    for header in ("cuda_runtime_api.h", "nvrtc.h"):
        found = [d for d in candidates if os.path.exists(os.path.join(d, header))][:1]
        dirs += [d for d in found if d not in dirs]
    return dirs


def _site_dirs():
    import site
    import sysconfig
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]] + list(site.getsitepackages())
    # and PYTHONPATH's: a GPU machine without network gets the cudnn-frontend wheel by
    # `pip install --target DIR` plus PYTHONPATH=DIR (README, "On a lent GPU")
    dirs += os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def _cudnn_graph_dirs(cuda_home):
    """(include dirs, library dir) for the cuDNN graph code, or None with the reason it is skipped."""
    if os.environ.get("FASTRES_SKIP_CUDNN") == "1":
        return None, "FASTRES_SKIP_CUDNN=1"
    frontend = [os.environ["CUDNN_FRONTEND_INCLUDE"]] if os.environ.get("CUDNN_FRONTEND_INCLUDE") else \
        [os.path.join(d, "include") for d in _site_dirs()]  # the nvidia-cudnn-frontend wheel's headers
    frontend = [d for d in frontend if os.path.exists(os.path.join(d, "cudnn_frontend.h"))][:1]
    cudnn = [os.environ["CUDNN_INCLUDE"]] if os.environ.get("CUDNN_INCLUDE") else \
        [os.path.join(d, "nvidia", "cudnn", "include") for d in _site_dirs()] + [os.path.join(cuda_home, "include")]
    cudnn = [d for d in cudnn if os.path.exists(os.path.join(d, "cudnn.h"))][:1]
    if not frontend:
        return None, "cudnn_frontend.h not found (pip install nvidia-cudnn-frontend, or set CUDNN_FRONTEND_INCLUDE)"
    if not cudnn:
        return None, "cudnn.h not found (set CUDNN_INCLUDE)"
    libs = [os.path.join(os.path.dirname(cudnn[0]), "lib"), os.path.join(cuda_home, "lib64")]
    libs = [d for d in libs if glob.glob(os.path.join(d, "libcudnn.so*"))][:1]
    if not libs:
        return None, f"libcudnn.so not found next to {cudnn[0]}"
    return (frontend + cudnn, libs[0]), ""


# Linker flags of fastres._C. -fopenmp: see cxx_flags below. --exclude-libs,ALL: whatever a static
# archive brings into _C stays private to it. A toolchain that links libstdc++ code into _C (the lent
# H200's /opt/gcc g++ did: cuda-gdb found std::ostream's own code inside _C.so) otherwise exports a
# second copy of libstdc++'s iostreams and locale from _C, the process's own libstdc++ interposes half
# of it, and `ostringstream << int64` in _C reads the wrong locale facet: a segfault there (the cuDNN
# graph cache key), an empty string here with -static-libstdc++ (tests/test_extension_build.py builds
# exactly that case).
LINK_FLAGS = ["-fopenmp", "-Wl,--exclude-libs,ALL"]


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
    link_flags = list(LINK_FLAGS)
    define_macros = []
    if use_cuda:
        # Compiling needs no GPU; without one torch cannot guess the architectures (with one,
        # torch builds for the GPUs it sees).
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define_macros.append(("FASTRES_WITH_CUDA", None))
        # The cuDNN graphs: one host-only TU (cudnn_frontend is header-only and slow to compile),
        # linked against torch's own libcudnn (already loaded by torch at import).
        include_dirs, library_dirs, libraries = [], _cudart_dirs(cpp_extension.CUDA_HOME), []
        graph_sources = _sources("csrc/cuda/*.cpp")
        found, why_not = _cudnn_graph_dirs(cpp_extension.CUDA_HOME)
        if found is not None and graph_sources:
            include_dirs += found[0] + _cuda_include_dirs(cpp_extension.CUDA_HOME)
            library_dirs.append(found[1])
            libcudnn = sorted(glob.glob(os.path.join(found[1], "libcudnn.so*")))[0]
            libraries.append(":" + os.path.basename(libcudnn))  # -l:libcudnn.so.9 (wheels ship no .so link)
            link_flags = link_flags + [f"-Wl,-rpath,{found[1]}"]
            nvrtc = _nvrtc_library(cpp_extension.CUDA_HOME)
            if nvrtc is not None:
                library_dirs.append(nvrtc[0])
                libraries.append(":" + nvrtc[1])
                link_flags = link_flags + [f"-Wl,-rpath,{nvrtc[0]}"]
            else:
                print("fastres: libnvrtc not found; the cuDNN graphs will need torch to have loaded it",
                      file=sys.stderr)
            define_macros.append(("FASTRES_WITH_CUDNN_GRAPHS", None))
            cpp_sources = cpp_sources + graph_sources
        else:
            print(f"fastres: building without the cuDNN graphs: {why_not}", file=sys.stderr)
        extension = cpp_extension.CUDAExtension(
            "fastres._C", cpp_sources + cuda_sources, define_macros=define_macros, include_dirs=include_dirs,
            library_dirs=library_dirs, libraries=libraries, extra_link_args=link_flags,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]})
    else:
        extension = cpp_extension.CppExtension("fastres._C", cpp_sources, define_macros=define_macros,
                                               extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
