"""The host-path measurement, in its own process (it replaces the Triton launchers with stubs)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from l2d_kernels import available_backends


@pytest.mark.skipif("triton" not in available_backends(), reason="needs the Triton backend (or its interpreter)")
def test_reports_every_case(tmp_path):
    out = tmp_path / "host.txt"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, str(root / "benchmarks" / "host_overhead.py"), "--calls", "20", "--out", str(out)],
                   check=True, env=env, timeout=300)
    lines = out.read_text().splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == [
        "fused_mld forward + autograd.grad", "fused_mld forward", "fused_led forward + autograd.grad",
        "fused_mld forward under no_grad", "fused_led forward under no_grad",
        "L2DLoss forward + backward (paper defaults)"]
    assert all(float(line.split(": ")[1].split()[0]) > 0 for line in lines)


@pytest.mark.skipif("triton" not in available_backends(), reason="needs Triton")
def test_launchers_mode_times_every_launcher(tmp_path):
    out = tmp_path / "launchers.txt"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the mode needs Triton's compiled launch path, which it stops short of the driver
    subprocess.run([sys.executable, str(root / "benchmarks" / "host_overhead.py"), "--launchers", "--calls", "20",
                    "--out", str(out)], check=True, env=env, timeout=300)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("Triton launchers per call, argument binding but no driver call")
    assert [line.split(":")[0] for line in lines[1:]] == [
        "mld_forward 64 x 80", "led_forward 64 x 80 (x 8)", "led_forward 64 x 80 (x 8), width split (2 slices)",
        "led_scale 64 x 80 (x 8)"]
    assert all(float(line.split(": ")[1].split()[0]) > 0 for line in lines[1:])
