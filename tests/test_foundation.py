"""The house: import never breaks, info() reports what it should, the CLI works, the bench report renders."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fmkernels as fk

PY = sys.executable


def _run(code: str, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([PY, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)


def test_import_without_extension_warns_once_and_falls_back():
    r = _run(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fmkernels as fk
            fk.info(); fk.info()
        msgs = [str(x.message) for x in w if "could not be loaded" in str(x.message)]
        print("WARNINGS", len(msgs))
        x = torch.randn(4, 8)
        y = fk.rms_norm(x, torch.ones(8))
        print("BACKEND", fk.info()["ops"]["rms_norm"]["cpu"])
        print("OK", float((y - torch.nn.functional.rms_norm(x, (8,), torch.ones(8), 1e-6)).abs().max()))
        """,
        {"FMK_DISABLE_EXT": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "BACKEND reference" in r.stdout
    assert "OK" in r.stdout


def test_import_with_broken_extension_warns_once():
    """An extension built for another torch fails at import with an undefined symbol: simulate it."""
    r = _run(
        """
        import sys, warnings, importlib.abc
        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fmkernels._C":
                    raise ImportError("fmkernels/_C.so: undefined symbol: _ZN3c104impl8GPUTrace")
                return None
        sys.meta_path.insert(0, Broken())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fmkernels as fk
            import torch
            fk.rms_norm(torch.randn(2, 4), None)
            fk.info()
        msgs = [str(x.message) for x in w if "could not be loaded" in str(x.message)]
        print("N", len(msgs), msgs[0][:200])
        print("EXT", fk.info()["cpu_extension"])
        """
    )
    assert r.returncode == 0, r.stderr
    assert "N 1 " in r.stdout and "undefined symbol" in r.stdout
    assert "'loaded': False" in r.stdout


def test_info_contents():
    d = fk.info()
    for key in ("fmkernels", "torch", "triton", "cpu_extension", "cuda_extension", "cpu_isa", "gpu", "ops"):
        assert key in d
    assert set(d["cpu_isa"]) >= {"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"}
    assert d["torch"] == torch.__version__
    assert "rms_norm" in d["ops"]
    o = d["ops"]["rms_norm"]
    assert o["cpu"] in ("cpu", "reference") and o["cuda"] in ("cuda", "triton", "reference", "none")
    assert o["cpu"] == ("cpu" if d["cpu_extension"].get("loaded") else "reference") or os.environ.get("FMK_BACKEND")


def test_fmk_info_cli():
    r = subprocess.run([PY, "-m", "fmkernels.cli", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "CPU extension" in r.stdout and "rms_norm" in r.stdout and "avx512f=" in r.stdout
    r = subprocess.run([PY, "-m", "fmkernels.cli", "info", "--json"], capture_output=True, text=True, timeout=300)
    assert json.loads(r.stdout)["ops"]["rms_norm"]


def test_lazy_public_names_are_clear_when_missing():
    with pytest.raises(AttributeError, match="has no attribute 'definitely_not_here'"):
        fk.definitely_not_here  # noqa: B018


def test_bench_report_renders(tmp_path):
    from fmkernels.bench import write_report

    data = {
        "benchmarks": [
            {"name": "a", "group": "g", "stats": {"median": 0.002},
             "extra_info": {"label": "fmk-cpu", "bytes": 2e9, "peak": 100.0, "peak_kind": "mem_gbs", "peer": False}},
            {"name": "b", "group": "g", "stats": {"median": 0.004},
             "extra_info": {"label": "torch", "bytes": 2e9, "peak": 100.0, "peak_kind": "mem_gbs", "peer": True}},
        ]
    }
    md = write_report(data, tmp_path)
    assert "| g | fmk-cpu | 2.000 | 1000.0 GB/s |" in md and "2.00x" in md
    assert (tmp_path / "results.json").exists()
