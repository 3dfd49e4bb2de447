"""Where LED's peak memory goes on a GPU: allocated bytes after each stage of one fused call.

    python benchmarks/memory_probe.py [backend ...]

For 32 x 1000 x 768 and 64 x 9605 x 768 (float32): the peak of forward, the memory held after it,
the peak of backward and whether the leaf's .grad is the kernel's own buffer, each in units of
one gradient buffer.
"""

import sys

import torch

from l2d_kernels import available_backends, fused_led
from l2d_kernels.labels import sample_targets


def probe(backend, B, C, D):
    es = torch.randn(B, C, D, device="cuda").requires_grad_()
    et = torch.randn(B, C, D, device="cuda")
    y = sample_targets(B, C, seed=3, device="cuda")
    size = es.numel() * es.element_size()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fused_led(es, et, y, backend=backend)
    torch.cuda.synchronize()
    fwd_peak, held = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated() - base
    print(f"{backend:6s} {B} x {C} x {D}: positives/image {y.float().sum(1).mean().item():.0f}, forward peak "
          f"{fwd_peak / size:.3f}, held {held / size:.3f}, backward peak {bwd_peak / size:.3f} gradients")


if __name__ == "__main__":
    for backend in sys.argv[1:] or [b for b in available_backends() if b != "torch"]:
        for shape in ((32, 1000, 768), (64, 9605, 768)):
            probe(backend, *shape)
            torch.cuda.empty_cache()
