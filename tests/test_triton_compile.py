"""Every Triton kernel, as its launcher launches it, compiles for sm_90 and sm_80 (the compiled path,
not the interpreter: CI has no GPU, so this is where a kernel that only the interpreter accepts is
caught)."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("arch", [90, 80], ids=["hopper", "ampere"])
def test_all_kernels_compile(arch):
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = pathlib.Path(__file__).with_name("triton_aot.py")
    root = script.parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script), "--arch", str(arch)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "compiled" in done.stdout
    for kernel in ("_mld_kernel", "_members_kernel", "_main_kernel", "_means_kernel", "_stats_kernel",
                   "_grad_kernel", "_plan_kernel", "_gram_kernel", "_split_kernel", "_finalize_kernel",
                   "_scale_kernel", "_empty"):
        assert kernel in done.stdout
