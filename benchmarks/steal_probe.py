"""Does autograd hand a custom op's precomputed gradient to a leaf's .grad without a copy?

Prints, for three ways of returning the saved gradient from backward, whether the leaf's .grad is
the op's own buffer ("stolen") or a copy ("cloned"), and the peak extra memory of forward + backward
in units of the gradient's size (1.0 = one gradient buffer, 2.0 = a copy was made).
"""

import torch
from torch import Tensor

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PTRS = []


@torch.library.custom_op("steal_probe::f", mutates_args=())
def f(x: Tensor) -> tuple[Tensor, Tensor]:
    g = torch.empty_like(x).fill_(2.0)
    PTRS.append(g.data_ptr())
    return (x * 0).sum().reshape(1).repeat(3), g


@f.register_fake
def _(x):
    return x.new_empty(3), torch.empty_like(x)


MODE = {"m": "saved"}


def setup(ctx, inputs, output):
    if MODE["m"] == "attr":
        ctx.grad = output[1].detach()
    else:
        ctx.save_for_backward(output[1])


def bwd(ctx, gl, _):
    if MODE["m"] == "attr":
        g, ctx.grad = ctx.grad, None
        return g.mul_(gl[0])
    (g,) = ctx.saved_tensors
    g = g.mul_(gl[0])
    return g.detach() if MODE["m"] == "detach" else g


torch.library.register_autograd("steal_probe::f", bwd, setup_context=setup)

for mode in ("saved", "detach", "attr"):
    MODE["m"] = mode
    x = torch.randn(4096, 4096, device=DEV).requires_grad_()
    size = x.numel() * x.element_size()
    if DEV == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    losses, _ = f(x)
    del _
    losses[0].backward()
    peak = (torch.cuda.max_memory_allocated() - base) / size if DEV == "cuda" else float("nan")
    print(f"{torch.__version__} {DEV} {mode:7s}: {'stolen' if x.grad.data_ptr() == PTRS[-1] else 'cloned'}, "
          f"peak extra {peak:.2f} gradients")
