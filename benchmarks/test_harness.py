"""What the quick benchmark set keeps (the GPU check's set, sized for a short lease)."""

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
