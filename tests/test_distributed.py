"""Global-batch CD with two gloo processes equals the single-process LED of the concatenated batch."""

import os
import socket
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import embeddings
from l2d_kernels import fused_led
from l2d_kernels import distributed

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, es, et, y, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * es.shape[0] // WORLD, (rank + 1) * es.shape[0] // WORLD)
        x = es[rows].clone().requires_grad_()
        calls = []

        def counted(*args, **kwargs):
            calls.append(args[0].shape[0])
            return fused_led(*args, **kwargs)

        with mock.patch.object(distributed, "fused_led", counted):
            total, cd, id_ = distributed.global_fused_led(x, et[rows], y[rows], lambda_cd=3.0, lambda_id=5.0,
                                                          backend="torch", return_components=True)
        total.backward()
        results[rank] = (total.detach(), cd, id_, x.grad, calls)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_on_the_concatenated_batch():
    es, et, y = embeddings(12, 10, 16, dtype=torch.float64, seed=11, density=0.5)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), es, et, y, results), nprocs=WORLD, join=True)
        results = dict(results)
    x = es.clone().requires_grad_()
    total, cd, id_ = fused_led(x, et, y, lambda_cd=3.0, lambda_id=5.0, backend="torch", return_components=True)
    total.backward()
    for rank in range(WORLD):
        got_total, got_cd, got_id, got_grad, calls = results[rank]
        assert calls == [es.shape[0]]  # one LED call, on the concatenated batch
        assert got_total.item() == pytest.approx(total.item(), rel=1e-12)
        assert got_cd.item() == pytest.approx(cd.item(), rel=1e-12)
        assert got_id.item() == pytest.approx(id_.item(), rel=1e-12)
        rows = slice(rank * 6, (rank + 1) * 6)
        assert torch.allclose(got_grad, x.grad[rows], rtol=1e-10, atol=1e-14)
    # The local CD alone would differ: the test would catch a per-process CD.
    local = fused_led(es[:6], et[:6], y[:6], lambda_cd=3.0, lambda_id=0.0, backend="torch")
    assert cd.item() > 0 and local.item() != pytest.approx(cd.item() * 3.0, rel=1e-3)
