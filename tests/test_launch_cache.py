"""The Triton launchers' direct launches (``triton_common.LaunchCache``) launch what Triton's
just-in-time path would, checked without a GPU by ``launch_replay.py`` (see there)."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = pathlib.Path(__file__).with_name("launch_replay.py")


def _run(cache_dir, *args):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, text=True, capture_output=True, timeout=600)
    if run.returncode == 0 and run.stdout.startswith("skipped:"):
        pytest.skip(run.stdout.strip())
    return run


def test_direct_launches_are_the_just_in_time_launches(tmp_path):
    run = _run(tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.rstrip().endswith("ok")
    assert "large groups" in run.stdout and "fell back" in run.stdout
    assert "lambda_cd 3 and 5 alternating" in run.stdout
    # The real compiled kernels' launches: the whole call replayed, with a launch hook (launch by launch),
    # launch by launch with tensors and with integer pointers (two cases each).
    assert run.stdout.count("arguments as Triton's") == 8
    assert run.stdout.count("whole-call replay: ") == 2 and run.stdout.count("a launch hook set, ") == 2
    assert run.stdout.count("integer pointers, ") == 2


def test_a_key_without_the_alignment_is_caught(tmp_path):
    """The check can fail: keys that ignore the inputs' 16-byte alignment replay an aligned kernel
    for misaligned inputs."""
    run = _run(tmp_path, "--without-alignment")
    assert run.returncode == 1
    assert "with a kernel of another specialization" in run.stderr, run.stderr[-4000:]
