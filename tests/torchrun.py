"""Run a worker script on N local gloo ranks through torch.distributed.run, with a hang turned into a failure."""

import os
import signal
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (a fixed one collides with a concurrent run of the suite)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave() -> None:
    """End a worker rank once its result is written: a barrier (rank 0 has saved), then os._exit(0), skipping the
    interpreter's finalization. In CI ranks aborted at exit after writing their result ("terminate called without an
    active exception": a gloo group still alive at finalization, see topd_ds/comm/distributed.leave_at_exit), in
    two_rank_partition.py and two_rank_teacher.py; the trainer's own fix is tested in test_soak.py. Nothing after the
    barrier is under test."""
    import torch.distributed
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(script: str, args: list, *, world: int, timeout_s: float, what: str, port: int = None) -> None:
    """tests/<script> on `world` ranks with `args`; fails the test (naming `what`) on a non-zero exit or when the
    ranks have not finished after timeout_s (then the launcher and every rank are killed). port: the
    rendezvous port, a free one when None."""
    port = free_port() if port is None else port
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}  # the launcher sets its own
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                             "--master_port", str(port), os.path.join(HERE, script), *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and all ranks
        log, _ = proc.communicate()
        pytest.fail(f"{what}: the {world} ranks did not finish in {timeout_s}s (hang)\n{log[-3000:]}")
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{log[-3000:]}"
