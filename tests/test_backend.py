"""The backend switch: names, errors, the context manager, threads and FASTRES_BACKEND."""
import os
import subprocess
import sys
import threading

import pytest

import fastres


def test_names_and_default():
    names = fastres.available_backends()
    assert names[:2] == ["auto", "torch"]
    assert set(names) <= {"auto", "torch", "triton", "cpp"}
    assert fastres.get_backend() == os.environ.get("FASTRES_BACKEND", "auto")


def test_use_backend_restores_even_on_error():
    before = fastres.get_backend()
    with pytest.raises(RuntimeError):
        with fastres.use_backend("torch") as name:
            assert name == "torch" and fastres.get_backend() == "torch"
            raise RuntimeError("boom")
    assert fastres.get_backend() == before


def test_set_backend_is_process_wide():
    before = fastres.get_backend()
    try:
        fastres.set_backend("torch")
        assert fastres.get_backend() == "torch"
    finally:
        fastres.set_backend(before)


def test_use_backend_is_per_thread():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other_thread():
        entered.wait()
        seen["other"] = fastres.get_backend()
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with fastres.use_backend("torch"):
        entered.set()
        release.wait(10)
    worker.join()
    assert seen["other"] == "auto"


@pytest.mark.parametrize("name,error,message", [
    ("cuda", ValueError, "must be one of"),
    (3, TypeError, "must be a str"),
])
def test_unknown_backend(name, error, message):
    with pytest.raises(error, match=message):
        fastres.set_backend(name)
    with pytest.raises(error, match=message):
        with fastres.use_backend(name):
            pass


def test_unavailable_backend_says_why():
    missing = [n for n in ("triton", "cpp") if n not in fastres.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(ValueError, match="not available"):
        fastres.set_backend(missing[0])


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_environment_variable_sets_default():
    run = _python("import fastres; print(fastres.get_backend())", FASTRES_BACKEND="torch")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "torch"
    bad = _python("import fastres", FASTRES_BACKEND="nonsense")
    assert bad.returncode != 0 and "FASTRES_BACKEND" in bad.stderr


def test_missing_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fastres._C': raise ImportError('simulated: not built')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastres, torch\n"
        "    model = fastres.resnet18(num_classes=3).eval()\n"
        "    model(torch.randn(1, 3, 32, 32))\n"
        "ours = [w for w in caught if 'fastres._C' in str(w.message)]\n"
        "print(len(ours), fastres.extension_loaded(), 'cpp' in fastres.available_backends())\n"
    )
    run = _python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1", "False", "False"]
