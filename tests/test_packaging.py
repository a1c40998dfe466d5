"""Packaging guards (issue 15, items 4-7): the torch-version record and its check at import, the build's refusal
to make a kernel-less wheel in an isolated environment, the sdist's contents. The full sdist -> wheel -> clean
venv round trip is `make package-check` (scripts/check_package.sh), part of `make test`."""
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _run(code: str, env_extra=None, **kw):
    env = dict(os.environ)
    env.pop("FMK_IGNORE_TORCH_VERSION", None)
    env.update(env_extra or {})
    return subprocess.run([PY, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO, **kw)


PROBE = """
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import fmkernels as fk, torch
        x = torch.randn(4, 8)
        y = fk.rms_norm(x, torch.ones(8))
        d = fk.info()
    msgs = [str(x.message) for x in w if "torch" in str(x.message) and "fmkernels" in str(x.message)]
    print("WARNINGS", len(msgs))
    print("MSG", msgs[0] if msgs else "")
    print("BACKEND", d["ops"]["rms_norm"]["cpu"])
    print("EXT", d["cpu_extension"])
    print("OK", float((y - torch.nn.functional.rms_norm(x, (8,), torch.ones(8), 1e-6)).abs().max()) < 1e-5)
"""


def _fake_record(tmp_path, version):
    p = tmp_path / "_build_info.json"
    p.write_text(json.dumps({"torch": version, "torch_cuda": None, "debug": False, "extensions": ["fmkernels._C"]}))
    return str(p)


def test_extension_built_for_another_torch_is_not_loaded(tmp_path):
    """A build recorded for another torch release: one warning naming both versions and the fix, no extension,
    every op on its reference backend, results still right."""
    r = _run(PROBE, {"FMK_BUILD_INFO": _fake_record(tmp_path, "2.99.0")})
    assert r.returncode == 0, r.stderr
    assert "WARNINGS 1" in r.stdout, r.stdout
    assert "built against torch 2.99.0" in r.stdout and torch.__version__ in r.stdout
    assert "--no-build-isolation" in r.stdout
    assert "BACKEND reference" in r.stdout and "'loaded': False" in r.stdout and "OK True" in r.stdout


def test_same_release_other_local_label_loads(tmp_path):
    """2.13.0 vs 2.13.0+cpu is the same release: loaded (only the X.Y.Z part is compared)."""
    from fmkernels import _ext

    if not _ext.has_cpu_ext():
        pytest.skip("the CPU extension is not built here")
    base = torch.__version__.split("+")[0]
    r = _run(PROBE, {"FMK_BUILD_INFO": _fake_record(tmp_path, base + "+cu999")})
    assert r.returncode == 0, r.stderr
    assert "WARNINGS 0" in r.stdout and "'loaded': True" in r.stdout


def test_ignore_torch_version_overrides(tmp_path):
    from fmkernels import _ext

    if not _ext.has_cpu_ext():
        pytest.skip("the CPU extension is not built here")
    r = _run(PROBE, {"FMK_BUILD_INFO": _fake_record(tmp_path, "2.99.0"), "FMK_IGNORE_TORCH_VERSION": "1"})
    assert r.returncode == 0, r.stderr
    assert "WARNINGS 0" in r.stdout and "'loaded': True" in r.stdout


def test_isolated_build_without_torch_fails_with_the_fix(tmp_path):
    """pip's isolated build has no torch: setup.py must stop with the one-line fix (not build a py3-none-any wheel
    without kernels). Simulated by a `torch` that cannot be imported; metadata / sdist commands still work."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('no torch in this environment')\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    r = subprocess.run([PY, "setup.py", "-q", "bdist_wheel", "-d", str(tmp_path / "whl")], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode != 0
    assert "pip install --no-build-isolation" in r.stderr, r.stderr
    assert not (tmp_path / "whl").exists() or not any((tmp_path / "whl").iterdir())
    r = subprocess.run([PY, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr


def test_sdist_holds_every_source_the_build_needs(tmp_path):
    """Every csrc/ file tracked by git (headers and csrc/cuda included), LICENSE, no compiled objects."""
    fake = tmp_path / "fake"  # no torch needed to make an sdist
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('no torch')\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    r = subprocess.run([PY, "setup.py", "-q", "sdist", "-d", str(tmp_path)], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    (sdist,) = tmp_path.glob("fmkernels-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "csrc"], capture_output=True, text=True, cwd=REPO).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    missing = sorted(set(tracked) - names)
    assert not missing, missing
    assert {"LICENSE", "setup.py", "pyproject.toml", "fmkernels/__init__.py"} <= names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]
    assert "Apache License" in open(os.path.join(REPO, "LICENSE")).read(2000)


def test_release_flags_and_system_headers():
    """setup.py's compile flags: no debug info unless FMK_DEBUG=1; torch's headers as system headers."""
    # setup.py's module-level _extensions() in a subprocess, with setup() itself a no-op
    code = """
        import sys, json, setuptools
        setuptools.setup = lambda **kw: None
        sys.argv = ["setup.py"]
        ns = {"__file__": "setup.py", "__name__": "setup"}
        exec(open("setup.py").read(), ns)
        ext = ns["ext_modules"][0]
        print(json.dumps(ext.extra_compile_args["cxx"]))
    """
    env = {"FMK_SKIP_CUDA": "1"}
    rel = json.loads(_run(code, env).stdout.strip().splitlines()[-1])
    dbg = json.loads(_run(code, dict(env, FMK_DEBUG="1")).stdout.strip().splitlines()[-1])
    assert "-g0" in rel and "-g" not in rel and "-O3" in rel
    assert "-g" in dbg and "-g0" not in dbg
    isys = [rel[i + 1] for i, f in enumerate(rel) if f == "-isystem"]
    from torch.utils.cpp_extension import include_paths

    assert set(include_paths()) <= set(isys)
