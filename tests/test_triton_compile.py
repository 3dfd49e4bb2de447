"""Every Triton kernel, as its launcher launches it, compiles for sm_90 and sm_80 (the compiled path,
not the interpreter: CI has no GPU, so this is where a kernel that only the interpreter accepts is
caught)."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_all_kernels_compile():
    """sm_90 and sm_80 at once (two processes: each compile is single-threaded and takes minutes)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = pathlib.Path(__file__).with_name("triton_aot.py")
    root = script.parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    runs = {arch: subprocess.Popen([sys.executable, str(script), "--arch", str(arch)], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for arch in (90, 80)}
    for arch, run in runs.items():
        stdout, stderr = run.communicate(timeout=1200)
        assert run.returncode == 0, f"sm_{arch}: " + stdout[-4000:] + stderr[-4000:]
        assert "compiled" in stdout
        for kernel in ("_mld_kernel", "_members_kernel", "_main_kernel", "_means_kernel", "_stats_kernel",
                       "_grad_kernel", "_plan_kernel", "_gram_kernel", "_split_kernel", "_finalize_kernel",
                       "_scale_kernel", "_empty"):
            assert kernel in stdout, f"sm_{arch}: {kernel} not compiled"
