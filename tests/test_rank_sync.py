"""Every rank in step (docs/TRAINING.md): equal micro-batches on every rank, and the other ranks' wait for
rank 0's work alone (eval, a batch, a server) bounded by a timeout that names it (2 gloo processes)."""

import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_micro_batches_are_equal_on_every_rank():
    """Random splits: with the owners of batch_scatter (i % world) and a global batch that the config check
    accepts, every rank runs the same number of micro-batches of the same size, together every sequence once;
    a rank whose share differs stops (check_equal_share) instead of leaving its peers in a gather."""
    from topd_ds.comm.batch_scatter import owners
    from topd_ds.errors import TopdError
    from topd_ds.train import check_equal_share, micro_batches

    rng = random.Random(0)
    for _ in range(200):
        world, micro = rng.randint(1, 8), rng.randint(1, 4)
        n = world * micro * rng.randint(1, 5)
        own = owners(n, world)
        local = [[i for i in range(n) if own[i] == r] for r in range(world)]
        parts = [micro_batches(len(mine), micro) for mine in local]
        assert len({len(p) for p in parts}) == 1
        assert all(len(mb) == micro for p in parts for mb in p)
        assert sorted(mine[j] for mine, p in zip(local, parts) for mb in p for j in mb) == list(range(n))
        for r in range(world):
            check_equal_share(len(local[r]), n, rank=r, world=world)
            with pytest.raises(TopdError, match=f"rank {r}: .* sequences this step, {n // world} expected"):
                check_equal_share(len(local[r]) + 1, n, rank=r, world=world)


WORKER = textwrap.dedent("""
    import sys, time
    import torch.distributed as dist
    from topd_ds.comm import distributed as ds
    from topd_ds.errors import TopdError

    dist.init_process_group("gloo")
    ds.make_wait_group(4.0)
    r = dist.get_rank()
    if r == 0:
        time.sleep(1.0)                        # slow, but within the limit: both go on
    ds.wait_for_rank0("a short job")
    print(f"rank {r}: met", flush=True)
    if r == 0:
        time.sleep(10)                         # past the limit
    try:
        ds.wait_for_rank0("evaluating step 7")
        print(f"rank {r}: passed", flush=True)
    except TopdError as err:
        print(f"rank {r}: {err}", flush=True)
    dist.destroy_process_group()  # a gloo group alive at exit can abort the process (comm/distributed.leave_at_exit)
""")


def test_wait_for_rank0_names_what_it_waited_for():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])  # a hang fails the test instead of blocking the suite
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("wait_for_rank0 hung")
    assert "rank 0: met" in outs[0] and "rank 1: met" in outs[1]
    assert "rank 1: rank 1: waited 4s for rank 0 to finish evaluating step 7 (train.rank0_wait_s)" in outs[1], outs[1]
