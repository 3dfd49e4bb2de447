"""The diagnostics, run on the CPU (torch backend, small shapes): the per-kernel profile command and the
Nsight Compute driver."""

import pytest

import kernel_profile


def test_profile_reports_every_case(tmp_path, capsys):
    out = tmp_path / "profile.md"
    assert kernel_profile.main(["--backends", "torch", "--calls", "2", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| torch |")]
    assert [row.split(" | ")[1] for row in rows] == [loss for loss, _ in kernel_profile.CASES]
    for row in rows:
        wall, host = (float(cell) for cell in row.split(" | ")[3:5])
        assert 0 < host <= wall * 1.001
    assert out.read_text() in capsys.readouterr().out


def test_report_lists_kernels_by_total_time():
    result = dict(wall_us=30.0, host_us=12.0, device_us=25.0, busy_us=21.5,
                  kernels=[("main_kernel", 2.0, 10.0), ("finalize", 1.0, 5.0)])
    table = kernel_profile.report([("triton", "led", (64, 80, 768), result)])
    assert "| triton | led | 64 x 80 x 768 | 30.0 | 12.0 | 25.0 | 21.5 | main_kernel 2x10.0; finalize 1x5.0 |" in table
    result["kernels"][0] = ("main_kernel", 2.0, 10.0, [16.0, 4.0])
    table = kernel_profile.report([("triton", "led", (64, 80, 768), result)])
    assert "main_kernel 2x10.0 (16.0 + 4.0); finalize 1x5.0 |" in table


def test_busy_time_counts_overlapping_kernels_once():
    assert kernel_profile.busy_time([]) == 0.0
    assert kernel_profile.busy_time([(0.0, 4.0), (6.0, 9.0)]) == 7.0  # one after another: the sum
    # An early launch's interval starts inside the previous one's (it waits there): counted once.
    assert kernel_profile.busy_time([(5.0, 12.0), (0.0, 6.0), (11.0, 13.0)]) == 13.0
    assert kernel_profile.busy_time([(0.0, 10.0), (2.0, 3.0), (4.0, 12.0)]) == 12.0  # one inside another


def test_triton_led_variants_are_extra_rows_and_leave_the_default(tmp_path):
    from l2d_kernels import available_backends
    from l2d_kernels.ops import triton_led

    if "triton" not in available_backends():
        import pytest
        pytest.skip(f"no Triton backend here: {available_backends()}")
    default = triton_led.NUM_WARPS, triton_led.LOAD_AHEAD, triton_led.SLICE_WIDTH, triton_led.GRAM_D
    out = tmp_path / "profile.md"
    assert kernel_profile.main(["--backends", "triton", "--calls", "1", "--triton-led-warps", "2",
                                "--triton-led-no-ahead", "--triton-led-slices", "0,16", "--triton-led-set",
                                "GRAM_D=16", "--triton-led-set", "GRAM_D=32 SMALL_WARPS=2", "--out", str(out)]) == 0
    assert (triton_led.NUM_WARPS, triton_led.LOAD_AHEAD, triton_led.SLICE_WIDTH, triton_led.GRAM_D) == default
    labels = [line.split(" | ")[0][2:] + "/" + line.split(" | ")[1] for line in out.read_text().splitlines()
              if line.startswith("| triton")]
    n_led = sum(loss == "led" for loss, _ in kernel_profile.CASES)
    assert labels == ([f"triton/{loss}" for loss, _ in kernel_profile.CASES] + ["triton/no-ahead/led"] * n_led
                      + ["triton/slice0/led"] * n_led + ["triton/slice16/led"] * n_led + ["triton/w2/led"] * n_led
                      + ["triton/GRAM_D=16/led"] * n_led + ["triton/GRAM_D=32 SMALL_WARPS=2/led"] * n_led)


def test_variant_rows_only_at_the_variant_shapes(tmp_path):
    from l2d_kernels import available_backends

    if "triton" not in available_backends():
        import pytest
        pytest.skip(f"no Triton backend here: {available_backends()}")
    led_shapes = [shape for loss, shape in kernel_profile.CASES if loss == "led"]
    assert len(led_shapes) > 1
    keep = "x".join(map(str, led_shapes[0]))
    out = tmp_path / "profile.md"
    assert kernel_profile.main(["--backends", "triton", "--calls", "1", "--losses", "led", "--triton-led-set",
                                "GRAM_D=16", "--variant-shapes", keep, "--out", str(out)]) == 0
    rows = [line.split(" | ")[0][2:] + " " + line.split(" | ")[2] for line in out.read_text().splitlines()
            if line.startswith("| triton")]
    shape = " x ".join(map(str, led_shapes[0]))
    assert rows == [f"triton {' x '.join(map(str, s))}" for s in led_shapes] + [f"triton/GRAM_D=16 {shape}"]


def test_bf16_rows_take_bfloat16_embeddings_at_the_variant_shapes(tmp_path, monkeypatch):
    import torch

    made = []
    real = kernel_profile.led_inputs

    def led_inputs(*shape, dtype=torch.float32):
        made.append((shape, dtype))
        return real(*shape, dtype=dtype)

    monkeypatch.setattr(kernel_profile, "led_inputs", led_inputs)
    led_shapes = [shape for loss, shape in kernel_profile.CASES if loss == "led"]
    keep = "x".join(map(str, led_shapes[0]))
    out = tmp_path / "profile.md"
    assert kernel_profile.main(["--backends", "torch", "--calls", "1", "--losses", "led", "--bf16",
                                "--variant-shapes", keep, "--out", str(out)]) == 0
    rows = [line.split(" | ")[0][2:] + " " + line.split(" | ")[2] for line in out.read_text().splitlines()
            if line.startswith("| torch")]
    shape = " x ".join(map(str, led_shapes[0]))
    assert rows == [f"torch {' x '.join(map(str, s))}" for s in led_shapes] + [f"torch/bf16 {shape}"]
    assert made == [(tuple(s), torch.float32) for s in led_shapes] + [(tuple(led_shapes[0]), torch.bfloat16)]


def test_settings_variants_one_per_value_or_all_in_one():
    assert kernel_profile._variants("GRAM_D=16,32") == [[("GRAM_D", 16)], [("GRAM_D", 32)]]
    assert kernel_profile._variants("GRAM_D=16 SMALL_WARPS=2") == [[("GRAM_D", 16), ("SMALL_WARPS", 2)]]


def test_combined_settings_hold_together_inside_and_are_restored():
    from l2d_kernels.ops import triton_led

    default = triton_led.GRAM_D, triton_led.SMALL_WARPS
    with kernel_profile._triton_led_settings([("GRAM_D", 16), ("SMALL_WARPS", 2)]):
        assert (triton_led.GRAM_D, triton_led.SMALL_WARPS) == (16, 2)
    assert (triton_led.GRAM_D, triton_led.SMALL_WARPS) == default


def test_a_setting_that_does_not_exist_is_refused():
    import pytest

    with pytest.raises(AttributeError):
        with kernel_profile._triton_led_setting("GRAM_WIDTH", 16):
            pass


def test_cuda_led_env_variant_sets_the_extension_settings_inside_and_restores_them(monkeypatch):
    import os

    monkeypatch.delenv("L2D_CUDA_LED_QUEUE", raising=False)
    monkeypatch.setenv("L2D_CUDA_LED_SLICE_WIDTH", "128")
    with kernel_profile._cuda_led_env(kernel_profile._variants("QUEUE=0 SLICE_WIDTH=64")[0]):
        assert os.environ["L2D_CUDA_LED_QUEUE"] == "0" and os.environ["L2D_CUDA_LED_SLICE_WIDTH"] == "64"
    assert "L2D_CUDA_LED_QUEUE" not in os.environ and os.environ["L2D_CUDA_LED_SLICE_WIDTH"] == "128"


def test_slices_variant_sets_the_width_inside_and_restores_it():
    from l2d_kernels.ops import triton_led

    default = triton_led.SLICE_WIDTH
    with kernel_profile._triton_led_setting("SLICE_WIDTH", 0):
        assert triton_led.SLICE_WIDTH == 0
    assert triton_led.SLICE_WIDTH == default


def test_no_ahead_variant_turns_the_switch_off_inside_and_restores_it():
    from l2d_kernels.ops import triton_led

    assert triton_led.LOAD_AHEAD
    with kernel_profile._triton_led_setting("LOAD_AHEAD", False):
        assert not triton_led.LOAD_AHEAD
    assert triton_led.LOAD_AHEAD


def test_launch_costs_line():
    from l2d_kernels import available_backends

    if "triton" not in available_backends():
        import pytest
        pytest.skip(f"no Triton backend here: {available_backends()}")
    line = kernel_profile.launch_costs(kernel_profile.DEVICE.type, calls=3)
    assert line.startswith("Host cost of one launch: an empty Triton kernel with 19 arguments ")
    assert line.count(" us") == 3 and "an autograd call of one" in line
    line = kernel_profile.direct_launch_costs(kernel_profile.DEVICE.type, calls=2, shape=(4, 6, 96))
    assert line.startswith("Triton launchers' host time per call: LED forward 4 x 6 x 96 ")
    assert line.count("launched directly launch by launch") == 2 and line.count("with integer pointers") == 2
    assert line.count("the whole call replayed") == 2 and line.count(" us") == 8


def test_objective_costs_line():
    from l2d_kernels import available_backends

    fused = [b for b in ("cuda", "triton") if b in available_backends()]
    if not fused:
        import pytest
        pytest.skip(f"no fused backend here: {available_backends()}")
    line = kernel_profile.objective_costs(fused, kernel_profile.DEVICE.type, calls=2, shape=(4, 6, 16))
    assert line.startswith("L2DLoss forward + backward at 4 x 6 x 16, bfloat16 inputs")
    assert line.count(" us") == len(fused) and all(f"{b} " in line for b in fused)


def test_ncu_driver_runs_both_cases_and_refuses_an_unknown_one():
    import ncu_driver

    assert ncu_driver.main(["led", "3", "4", "8", "torch"]) == 0
    assert ncu_driver.main(["mld", "3", "4", "torch"]) == 0
    with pytest.raises(SystemExit, match="unknown loss"):
        ncu_driver.main(["bce", "3", "4", "torch"])


def test_the_gpu_checks_default_profile_settings_parse():
    """Every variant setting of the GPU check's default profile command is one the profile reads (on an
    H200, ``--cuda-led-env QUEUE=0,EARLY_LAUNCH=0`` stopped the whole profile step)."""
    import pathlib
    import re
    import shlex

    script = (pathlib.Path(kernel_profile.__file__).parent / "gpu_check.sh").read_text()
    args = shlex.split(re.search(r"L2D_PROFILE_ARGS:-([^}]*)\}", script).group(1))
    settings = [args[i + 1] for i, a in enumerate(args) if a in ("--cuda-led-env", "--triton-led-set")]
    assert settings
    for setting in settings:
        assert kernel_profile._variants(setting)
