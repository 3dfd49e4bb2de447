"""The ahead-of-time Triton cache (``triton_cache.py``): compiled on a machine without a GPU, every launch
of the same calls through Triton's just-in-time path finds its kernel there, also once the cache has
been moved to another folder; and its case list follows the benchmarks' shapes."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = pathlib.Path(__file__).resolve().parent


def _tool(cache: pathlib.Path, *args: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(HERE / "triton_cache.py"), "--cases", "small", *args], env=env,
                         text=True, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_compiled_ahead_then_found_by_every_launch(tmp_path):
    cache = tmp_path / "first"
    out = _tool(cache, "--jobs", "2", "--binary-only", "--verify")
    assert "0 found in the cache" in out  # a new cache: everything compiled here
    assert "verify: 7 launches found their kernel in the cache, 0 compiled" in out
    assert not [p for p in cache.rglob("*") if p.suffix in (".ptx", ".llir", ".ttir", ".ttgir", ".source")]
    origin = json.loads((cache / "l2d-cache-origin.json").read_text())
    assert origin["arch"] == 90 and len(origin["triton_key"]) == 16
    # Moved: the index files name their files by absolute path; the tool points them at the new place.
    moved = tmp_path / "moved"
    shutil.move(cache, moved)
    out = _tool(moved, "--jobs", "1", "--verify")
    assert "7 found in the cache, 0 compiled" in out
    assert "(the same build)" in out
    assert "verify: 7 launches found their kernel in the cache, 0 compiled" in out


def test_compiles_only_what_the_cache_lacks(tmp_path):
    cache = tmp_path / "cache"
    _tool(cache, "--jobs", "1")
    victim = next(p for p in cache.glob("*/*.cubin") if "split_kernel" in p.name)
    shutil.rmtree(victim.parent)
    out = _tool(cache, "--jobs", "1", "--verify")
    assert "6 found in the cache, 1 compiled" in out
    assert out.splitlines()[-1] == "verify: 7 launches found their kernel in the cache, 0 compiled"


def test_cases_follow_the_benchmark_shapes():
    sys.path.insert(0, str(HERE))
    import triton_cache
    from harness import GPU_LED_SHAPES, GPU_MLD_SHAPES

    names = [name for name, _ in triton_cache.gpu_check_cases()]
    for _, B, C, D in GPU_LED_SHAPES:
        assert f"led {B}x{C}x{D} float32" in names and f"led {B}x{C}x{D} bfloat16" in names
    for B, C in [(B, C) for _, B, C in GPU_MLD_SHAPES] + [(B, C) for _, B, C, _ in GPU_LED_SHAPES[:3]]:
        assert f"mld {B}x{C} float32 batchmean" in names  # the MLD benchmark's, and L2D's (test_l2d.py)
    assert any(name.endswith("tiny scratch") for name in names)  # the sanitizer driver's split path
    import preflight

    for loss, shape, dtype in preflight.CASES:  # the GPU check's preflight, with LED's launches in order too
        name = f"{loss} {'x'.join(map(str, shape))} {str(dtype)[6:]}"
        assert (name if loss == "led" else name + " batchmean") in names
        assert loss == "mld" or f"{name} EARLY_LAUNCH=0" in names
    from test_random_targets import GPU_TRITON_SHAPES

    for B, C, D in GPU_TRITON_SHAPES:  # the random-targets test's Triton cases
        assert f"led {B}x{C}x{D} float32" in names
    assert len(names) == len(set(names))
