"""`import flux` is light: its top-level names load on first use, so `python -m flux.env` runs
without runpy's "found in sys.modules" RuntimeWarning and config checks need no torch."""
from __future__ import annotations

import subprocess
import sys


def test_python_m_flux_env_prints_no_runtime_warning():
    res = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "flux.env"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RuntimeWarning" not in res.stderr and "found in sys.modules" not in res.stderr


def test_import_flux_imports_no_torch_and_names_still_resolve():
    code = ("import sys, flux; assert 'torch' not in sys.modules, 'import flux pulled torch'; "
            "assert callable(flux.patch) and callable(flux.ops.quantize) and callable(flux.env_report); "
            "assert 'ops' in dir(flux); print(flux.__version__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
