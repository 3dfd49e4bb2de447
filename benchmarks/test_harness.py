"""The benchmark harness: what the quick set keeps, and the training step's paired rounds."""

import statistics

import pytest
import torch

import harness


def test_quick_set_keeps_fused_calls_baselines_at_the_anchors_and_graph_replays_of_the_main_case(monkeypatch):
    monkeypatch.setattr(harness, "BENCH_SET", "quick")
    f32, bf16 = torch.float32, torch.bfloat16
    assert harness.selected("fused-triton", "voc", f32, "fwd")
    assert harness.selected("fused-triton", "coco", bf16, "fwd+bwd")
    assert not harness.selected("fused-triton", "voc", bf16, "fwd+bwd")
    assert harness.selected("fused-cuda+graph", "voc", f32, "fwd+bwd")
    assert not harness.selected("fused-cuda+graph", "coco", f32, "fwd")
    assert not harness.selected("fused-cuda+graph", "coco", bf16, "fwd+bwd")
    assert harness.selected("torch.compile", "coco", f32, "fwd+bwd")
    assert not harness.selected("eager-vectorized", "voc", f32, "fwd+bwd")
    monkeypatch.setattr(harness, "BENCH_SET", "full")
    assert harness.selected("fused-cuda+graph", "coco", bf16, "fwd")


def test_paired_rounds_cancel_a_drift_that_a_difference_of_medians_reports():
    # Rounds 1-3 of the form ran 10 ms slow, as did the baseline step before each; the losses cost 1 ms.
    form = [0.045, 0.046, 0.044, 0.035, 0.036]
    baseline = [0.050, 0.044, 0.045, 0.043, 0.034, 0.035]  # the first preceded the warm-up round
    losses, bce = harness.paired_losses_s(form, baseline)
    assert abs(losses - 0.001) < 1e-12
    assert bce == 0.043
    assert statistics.median(form) - 0.034 > 0.009  # against a baseline timed later, after the drift: 10x
    with pytest.raises(ValueError, match="need as many baselines"):
        harness.paired_losses_s(form, baseline[:4])


def test_a_setup_runs_untimed_before_every_round_and_makes_rounds_single_calls(benchmark, request):
    if benchmark.disabled:
        pytest.skip("pytest-benchmark runs no rounds here (disabled, as under xdist)")
    calls = []
    info = dict(loss="step", form="fused-torch", shape="tiny", B=1, C=1, D=1, dtype="bf16-autocast",
                pass_="train step", floor_us=None, bytes=0)
    harness.run_case(benchmark, request, lambda: calls.append("form"), info, rounds=4,
                     setup=lambda: calls.append("setup"))
    assert benchmark.extra_info["calls_per_round"] == 1
    # Two warm-up calls and the peak-memory call, then (warm-up round + 4 rounds) pairs.
    assert calls[-10:] == ["setup", "form"] * 5
    assert len(benchmark.stats.stats.data) == 4


def test_warm_only_makes_one_call_and_times_nothing(benchmark, request, monkeypatch):
    monkeypatch.setattr(harness, "WARM_ONLY", True)
    calls = []
    info = dict(loss="mld", form="torch.compile", shape="coco", B=1, C=1, D=0, dtype="torch.float32",
                pass_="fwd+bwd", floor_us=None, bytes=0)
    harness.run_case(benchmark, request, lambda: calls.append("form"), info)
    assert calls == ["form"]
    assert "first_call_s" not in benchmark.extra_info and benchmark.stats is None
