"""Every Triton kernel, as its launcher launches it, compiles for sm_90 and sm_80 (the compiled path,
not the interpreter: CI has no GPU, so this is where a kernel that only the interpreter accepts is
caught)."""

import json
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


_KEYS = """
import json, sys
from l2d_kernels.ops import triton_common, triton_led, triton_mld
from triton.runtime.jit import JITFunction
modules = (triton_common, triton_led, triton_mld)
fns = {f"{m.__name__}.{n}": f for m in modules for n, f in vars(m).items()
       if isinstance(f, JITFunction) and f.__module__ == m.__name__}
first = sys.argv[1]
fns[first].cache_key  # what Triton computes at a launch: that kernel's key before any other's
keys = {name: f.cache_key for name, f in fns.items()}
# Each function's globals must include every callee's: the key of a callee hashed after its caller
# would lack them (Triton before 3.7).
incomplete = []
for name, f in fns.items():
    for node in __import__("ast").walk(f.parse()):
        callee = f.__globals__.get(getattr(node, "id", None))
        if isinstance(callee, JITFunction) and not set(callee.used_global_vals) <= set(f.used_global_vals):
            incomplete.append((name, callee.__name__))
print(json.dumps({"keys": keys, "incomplete": incomplete}))
"""


def test_cache_keys_do_not_depend_on_what_was_launched_first():
    """Triton's on-disk key of a kernel is the same in every process, whichever kernel the process
    launched first (``triton_common.settle_cache_keys``): else a new process misses the cache."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = pathlib.Path(__file__).parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    firsts = ["l2d_kernels.ops.triton_led._split_kernel", "l2d_kernels.ops.triton_led._gram_kernel",
              "l2d_kernels.ops.triton_led._main_kernel", "l2d_kernels.ops.triton_mld._mld_kernel"]
    runs = [subprocess.Popen([sys.executable, "-c", _KEYS, first], env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for first in firsts]
    results = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout))
    assert all(r["incomplete"] == [] for r in results), [r["incomplete"] for r in results]
    assert all(r["keys"] == results[0]["keys"] for r in results[1:])
    assert len(results[0]["keys"]) > 40


_MLD_SASS = """
import collections, pathlib, re, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
import torch, triton
import triton_cache
records = triton_cache.record([triton_cache._mld_case(4096, 1000, torch.float32)], 90)
(data, (module, name)), = [(d, w) for d, w in records.items() if w[1] == "_mld_kernel"]
with triton_cache._stand_in_driver(90):
    kernel = getattr(__import__(module, fromlist=[name]), name).preload(data)
cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
    fh.write(kernel.asm["cubin"])
    fh.flush()
    sass = subprocess.run([str(cuobjdump), "-sass", fh.name], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", fh.name], capture_output=True, text=True,
                           check=True).stdout
ops = re.findall(r"/\\*[0-9a-f]{4}\\*/\\s+(?:@!?U?P\\w+\\s+)?([A-Z0-9_.]+)", sass)
# The loop over a program's row blocks: its one conditional branch back, (from - to) / 16 instructions.
branch = r"/\\*([0-9a-f]{4})\\*/\\s+@!?P\\d\\s+BRA\\s+0x([0-9a-f]+)"
branches = [(int(a, 16), int(t, 16)) for a, t in re.findall(branch, sass)]
back = [(a - t) // 16 for a, t in branches if t < a]
print(len(ops), sum(op == "MUFU.EX2" for op in ops), len(re.findall(r"FSETP\\.GEU\\.AND [^;]*, -126,", sass)),
      re.search(r"REG:(\\d+)", usage).group(1), re.search(r"STACK:(\\d+)", usage).group(1), *back)
"""


def test_mld_kernel_stays_within_its_instruction_budget():
    """The MLD kernel is bound by instruction issue at 4096 x 1000 (PERF_NOTES), so its sm_90 machine
    code is the measure: each exponential one MUFU.EX2 with no denormal guard around it (tl.exp's
    ex2.approx.f32 brought three more instructions each, 1,640-1,672 in all for a pass of 8 labels),
    and at most 64 registers without spilling (eight programs per SM: 4096 x 1000 in one wave). A
    program at 4096 x 1000 runs its loop four times, so the loop is held apart: 927 instructions a pass
    before the nearly-agreeing loss forms, 951 with them and the fitted polynomials (1,144 and 1,056
    in all: PERF_NOTES)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = pathlib.Path(__file__).parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _MLD_SASS, str(root / "benchmarks")], env=env, text=True,
                         capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    total, ex2, guards, registers, stack, *loops = map(int, run.stdout.split())
    assert registers <= 64 and stack == 0
    assert ex2 == 64  # 8 exponentials a label, 8 labels a pass
    assert guards == 0
    assert total <= 1100, total
    assert len(loops) == 1 and loops[0] <= 960, loops


_CHAIN = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import triton_cache
from l2d_kernels.ops import triton_common, triton_led

launches = []
for cls in (triton_common._Recording, triton_common._JitLaunch):
    def spy(self, fn, grid, *args, _launch=cls.__call__, **kwargs):
        launches.append((fn.__name__, kwargs.get("GDC", False), kwargs.get("launch_pdl", False)))
        return _launch(self, fn, grid, *args, **kwargs)
    cls.__call__ = spy
arch = int(sys.argv[2])
if sys.argv[3] == "attribute":
    triton_led.EARLY_LAUNCH = False
triton_cache.record([triton_cache._led_case(4, 40, 160, torch.float32)], arch)
print(json.dumps(launches))
"""


@pytest.mark.parametrize("arch, switch", [(90, "default"), (90, "environment"), (90, "attribute"), (80, "default")])
def test_led_launches_form_a_chain_on_sm90(arch, switch):
    """As Triton's launch path would compile them for sm_<arch> (the cache tool's stand-in driver):
    on sm_90 every LED kernel of a call waits for the previous launch and lets the next start (GDC),
    and every launch after the call's first may start early (launch_pdl); before sm_90, or with
    early launches switched off (``L2D_TRITON_EARLY_LAUNCH=0`` at import, or ``EARLY_LAUNCH``
    set to False), neither (griddepcontrol needs sm_90). The backward's scaling, a call of its own,
    is not chained."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("L2D_TRITON_EARLY_LAUNCH", None)
    if switch == "environment":
        env["L2D_TRITON_EARLY_LAUNCH"] = "0"
    early = switch == "default"
    root = pathlib.Path(__file__).parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _CHAIN, str(root / "benchmarks"), str(arch), switch], env=env,
                         text=True, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    launches = json.loads(run.stdout.splitlines()[-1])
    forward = [launch for launch in launches if launch[0] != "_scale_kernel"]
    names = [name for name, _, _ in forward]
    assert names[:3] == ["_plan_kernel", "_gram_kernel", "_split_kernel"] and len(names) >= 5, names
    assert ["_scale_kernel", False, False] in launches
    if arch >= 90 and early:
        assert forward[0][1:] == [True, False]
        assert all(launch[1:] == [True, True] for launch in forward[1:]), forward
    else:
        assert all(launch[1:] == [False, False] for launch in launches), launches
