"""Fused backends. ``library`` registers their operators and autograd; a kernel module per loss."""
