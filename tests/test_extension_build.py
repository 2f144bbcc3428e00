"""setup.py's link flags keep a statically linked libstdc++ private to fastres._C.

On the lent H200 the toolchain's g++ put a copy of libstdc++ into _C; exported, half of it was
interposed by the process's own libstdc++ and `ostringstream << int64` segfaulted in the cuDNN graph
cache key (benchmarks/results/gpu_check.md). `-static-libstdc++` reproduces that toolchain here
(formatting then silently yields a wrong string); this test builds a tiny extension that way with
setup.py's LINK_FLAGS and needs numbers and a TORCH_CHECK message to come out right.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE = r"""
#include <torch/extension.h>
#include <sstream>
std::string fmt(int64_t v) {
  TORCH_CHECK(v >= 0, "fmt: v must be >= 0, got ", v);
  std::ostringstream s;
  s << v << '|' << true << '|' << 2.5;
  return s.str();
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("fmt", &fmt); }
"""


def setup_link_flags() -> list:
    """LINK_FLAGS as setup.py spells it (read, not imported: importing setup.py runs setup())."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LINK_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py defines no LINK_FLAGS")


def _static_libstdcxx_available() -> bool:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False
    found = subprocess.run([cxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(found) and os.path.exists(found)


def test_link_flags_keep_static_archives_private():
    assert "-Wl,--exclude-libs,ALL" in setup_link_flags()


@pytest.mark.skipif(not _static_libstdcxx_available(), reason="no C++ compiler with a static libstdc++ here")
def test_static_libstdcxx_extension_formats_numbers(tmp_path):
    from torch.utils import cpp_extension

    (tmp_path / "fmt.cpp").write_text(SOURCE)
    module = cpp_extension.load(name="fastres_libstdcxx_probe", sources=[str(tmp_path / "fmt.cpp")],
                                extra_ldflags=["-static-libstdc++"] + setup_link_flags(),
                                build_directory=str(tmp_path), verbose=False)
    assert module.fmt(123456789012) == "123456789012|1|2.5"
    with pytest.raises(RuntimeError, match=r"fmt: v must be >= 0, got -5"):
        module.fmt(-5)
