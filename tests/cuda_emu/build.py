"""Build csrc/'s kernels and host code for the CPU emulator (see emu.h) as the operators
``torch.ops.l2d_emu.mld`` and ``torch.ops.l2d_emu.led`` on CPU tensors.

    python tests/cuda_emu/build.py     # builds (or reuses) and loads; prints where

The sources are copied with two rewrites the host compiler needs, and nothing else changed:
``kernel<<<grid, block, shm, stream>>>(args)`` becomes ``::l2d_emu::launch(kernel, grid, block, shm,
stream)(args)``, and the host code's ``is_cuda()`` input checks accept CPU tensors. The build goes
to ``build/cuda-emu/torch-<version>`` under the repository (one per torch, so that switching between
torch versions does not rebuild) and is reused while sources and flags are unchanged.

Builds wait on an OS file lock, which a killed process releases. Before torch 2.14, torch's own
build lock was a file whose mere presence blocks, so a build stopped midway (Ctrl-C during the first
test run), or the lock file torch 2.14 leaves in place, made every later load wait forever; holding
the OS lock, a build removes such a file first.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import sys

try:
    import fcntl
except ImportError:  # not a POSIX system: torch's lock alone
    fcntl = None

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
KERNEL_SOURCES = ["mld.cu", "led.cu", "led_float.cu", "led_half.cu", "led_bf16.cu", "scale.cu"]
# Misaligned accesses (a float4 load off a 16-byte boundary faults on the GPU) stop the process with
# the source line, instead of passing on the CPU.
SANITIZE = ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"]
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<(.*?)>>>\(", re.S)


def rewrite(source: str) -> tuple[str, int]:
    """The two rewrites (see the module docstring), and how many were made; raises if a launch or a
    check is left that they did not match, which would mean this script no longer matches the sources."""
    out, n_launches = LAUNCH.subn(r"::l2d_emu::launch(\1, \2)(", source)
    out, n_checks = re.subn(r"\.is_cuda\(\)", ".is_cpu()", out)
    if "<<<" in out or "is_cuda(" in out:
        raise RuntimeError("a kernel launch or an is_cuda() check left that the rewrites did not match")
    return out, n_launches + n_checks


def build(verbose: bool = False):
    """Build (or reuse) the emulated extension and load it; returns ``torch.ops.l2d_emu``."""
    import torch
    from torch.utils import cpp_extension

    out_dir = ROOT / "build" / "cuda-emu" / f"torch-{torch.__version__}"
    src_dir = out_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        sources, rewrites = [], 0
        for name in KERNEL_SOURCES:
            target = src_dir / (pathlib.Path(name).stem + ".cpp")
            text, made = rewrite((CSRC / name).read_text())
            rewrites += made
            if not target.exists() or target.read_text() != text:  # keep mtimes stable for the cache
                target.write_text(text)
            sources.append(str(target))
        if rewrites == 0:
            raise RuntimeError("no kernel launch and no is_cuda() check found to rewrite")
        sources += [str(HERE / name) for name in ("register.cpp", "selftest.cpp", "guard.cpp")]
        cpp_extension.load(
            name="l2d_emu",
            sources=sources,
            extra_include_paths=[str(HERE / "shim"), str(CSRC)],
            extra_cflags=["-O1", "-include", str(HERE / "emu.h"), "-Wno-unused-function", *SANITIZE],
            extra_ldflags=SANITIZE,
            build_directory=str(out_dir),
            is_python_module=False,
            verbose=verbose,
        )
    return torch.ops.l2d_emu


@contextlib.contextmanager
def _exclusive(out_dir: pathlib.Path):
    """One build at a time in ``out_dir`` (pytest-xdist workers build at once), under an OS lock;
    a torch lock file there while this lock is held is stale (see the module docstring)."""
    if fcntl is None:
        yield
        return
    with open(out_dir / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (out_dir / "lock").unlink(missing_ok=True)
        yield


if __name__ == "__main__":
    ops = build(verbose="-v" in sys.argv)
    print("built and loaded:", ops.mld, ops.led)
