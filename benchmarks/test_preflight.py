"""preflight.py: the GPU check's gate before its timed steps passes a backend that agrees with the
reference and stops at the first case that does not, whichever check that is."""

import itertools
import pathlib
import shutil
import subprocess

import pytest
import torch

import preflight


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs it on the GPU, as a step of its own")
def test_the_triton_backend_passes(capsys):
    pytest.importorskip("triton")
    assert preflight.main(["triton"]) == 0  # in Triton's interpreter (conftest.py)
    out = capsys.readouterr().out
    assert out.count("repeated calls bitwise equal") == len(preflight.CPU_CASES)
    assert out.count("launches in order bitwise equal") == sum(loss == "led" for loss, _, _ in preflight.CPU_CASES)
    assert "FAILED" not in out


def _sabotage(monkeypatch, name, spoil):
    """Replace preflight's fused_led or fused_mld by the reference, spoiled on the calls ``spoil``
    picks (it gets the call's number, 0 the first, and the inputs)."""
    real = getattr(preflight, name)
    count = itertools.count()

    def fused(*args, backend, **kwargs):
        out = real(*args, backend="torch", **kwargs)
        return out * (1 + 1e-6) if spoil(next(count), args) else out

    monkeypatch.setattr(preflight, name, fused)


def _run(capsys):
    rc = preflight.main(["torch"])
    return rc, capsys.readouterr()


def test_a_repeated_call_that_differs_fails(monkeypatch, capsys):
    # The loss and gradient scaled by 1 + 1e-6 on the third call: within the tolerance, not bitwise.
    _sabotage(monkeypatch, "fused_mld", lambda n, args: n == 2)
    rc, out = _run(capsys)
    assert rc == 1
    assert "repeated calls DIFFER" in out.out and "-- FAILED: repeated calls" in out.out
    assert out.out.rstrip().splitlines()[-1].startswith("FAILED mld ")  # every LED case before it passed


def test_launches_in_order_that_differ_fail(monkeypatch, capsys):
    _sabotage(monkeypatch, "fused_led", lambda n, args: not preflight.triton_led.EARLY_LAUNCH)
    rc, out = _run(capsys)
    assert rc == 1 and "launches in order DIFFER" in out.out and "repeated calls bitwise equal" in out.out
    assert out.out.count("\n") == 2  # the heading and the first case: it stops there
    assert preflight.triton_led.EARLY_LAUNCH  # restored after the in-order call


def test_a_result_off_the_reference_fails(monkeypatch, capsys):
    real = preflight.fused_led

    def fused(*args, backend, **kwargs):
        return real(*args, backend="torch", **kwargs) * 1.001

    monkeypatch.setattr(preflight, "fused_led", fused)
    rc, out = _run(capsys)
    assert rc == 1 and "-- FAILED: reference" in out.out and "loss 1.0e-03" in out.out


def test_a_call_that_raises_stops_the_run(monkeypatch, capsys):
    def fused(*args, backend, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(preflight, "fused_mld", fused)
    rc, out = _run(capsys)
    assert rc == 1 and "illegal memory access" in out.err  # the traceback
    assert out.out.splitlines()[-1] == ("FAILED mld 64 x 80 float32: raised RuntimeError: "
                                        "CUDA error: an illegal memory access was encountered")


GPU_CHECK = pathlib.Path(__file__).resolve().parent / "gpu_check.sh"


def _gpu_check_functions() -> str:
    """gpu_check.sh's note and step, and its preflight's settings and functions, as written there."""
    lines = GPU_CHECK.read_text().splitlines()
    note = next(i for i, line in enumerate(lines) if line.startswith("note() {"))
    step_end = next(i for i in range(note, len(lines)) if lines[i] == "}")
    first = next(i for i, line in enumerate(lines) if line.startswith("# What each backend's preflight tries"))
    last = next(i for i, line in enumerate(lines) if line.startswith("bench_all() {"))
    return "\n".join(lines[note:step_end + 1] + lines[first:last])


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
@pytest.mark.parametrize("passes_with, chosen, rc", [
    ("", None, 0),  # the defaults agree: nothing is chosen
    ("L2D_TRITON_CALL_REPLAY=0", "L2D_TRITON_CALL_REPLAY=0", 1),  # the third try: the replay was at fault
    ("L2D_TRITON_EARLY_LAUNCH=0", "L2D_TRITON_EARLY_LAUNCH=0", 1),
    ("never", None, 1),
])
def test_the_gpu_check_takes_the_first_configuration_that_agrees(tmp_path, passes_with, chosen, rc):
    # A stand-in for python that passes the preflight only with passes_with in its environment.
    fake = tmp_path / "fake-python"
    condition = "true" if not passes_with else ("false" if passes_with == "never" else
                                                f'[ "${{{passes_with.split("=")[0]}:-}}" = 0 ]')
    fake.write_text(f"#!/usr/bin/env bash\necho \"$@\" >> calls.txt\n{condition}\n")
    fake.chmod(0o755)
    script = f"""set -uo pipefail
OUT=out LOG=out/log.txt DEADLINE=100 T0=$SECONDS PY={fake} failed=0
mkdir -p out build
{_gpu_check_functions()}
preflight triton "${{PREFLIGHT_TRITON[@]}}"
echo "rc=$? failed=$failed"
bench_env
echo "exported: ${{L2D_TRITON_EARLY_LAUNCH:-}}/${{L2D_TRITON_CALL_REPLAY:-}}"
"""
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, text=True, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"rc={rc} failed={rc}" in run.stdout
    summary = (tmp_path / "out" / "summary.txt").read_text()
    tries = (tmp_path / "calls.txt").read_text().splitlines()
    assert all(t == "benchmarks/preflight.py triton" for t in tries)
    if chosen is None:
        assert not (tmp_path / "build" / "bench-env").exists()
        assert "timed steps run with" not in summary and "exported: /" in run.stdout
        assert len(tries) == (1 if passes_with == "" else 4)
        assert ("no configuration agreed" in summary) == (passes_with == "never")
    else:
        assert (tmp_path / "build" / "bench-env").read_text() == chosen + "\n"
        assert f"timed steps run with {chosen} (the preflight's choice)" in summary
        assert f"preflight-triton with {chosen}: ok" in summary and "preflight-triton: FAILED" in summary
        name, value = chosen.split("=")
        assert ("exported: 0/" if name == "L2D_TRITON_EARLY_LAUNCH" else "exported: /0") in run.stdout
