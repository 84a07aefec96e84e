"""tests/wgmma_smoke.py (make gpu's first contact with the Hopper mainloops) on the CPU: its
snippets run against the references (device 'cpu'), so a typo in them cannot cost a GPU session,
and without a GPU it writes an empty environment file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import wgmma_smoke  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "python"), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("var", sorted(wgmma_smoke.CASES))
def test_snippets_run(var):
    code = wgmma_smoke.CASES[var].replace('device="cuda"', 'device="cpu"').replace(
        "torch.cuda.synchronize()", "")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_without_gpu_writes_an_empty_env_file(tmp_path):
    from qwen3x.testing import wgmma_available  # noqa: PLC0415

    if wgmma_available():
        pytest.skip("a Hopper GPU is here: the smoke run is the real one")
    env_file = tmp_path / "mainloop.env"
    r = subprocess.run([sys.executable, str(HERE / "wgmma_smoke.py"), str(env_file)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "mma.sync mainloops are the defaults" in r.stdout
    assert env_file.read_text() == ""
