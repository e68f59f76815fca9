"""Soak and shutdown (issue 8 promise 7; docs/RELIABILITY.md section 7).

* a short soak: scripts/soak.py for 20 pipelined TOPD steps; thread counts constant, queue depth within
  queue_size, two live servers at every step, none left after exit (the 300-step run is in the doc);
* the queue bound itself, on a pipeline whose consumer does not keep up (no servers);
* Ctrl-C: SIGINT to a training `topd-ds train` (its whole process group, as a terminal sends it) exits
  within a bound with one line, no traceback, its servers stopped, nothing half-written left.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from test_pipeline import _TimedPipeline
from test_train_e2e import child_env, start_interruptible

from topd_ds import procstat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("soak", os.path.join(REPO, "scripts", "soak.py"))
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

PARTITIONED = os.path.join(REPO, "tests", "ds_zero3_partitioned.json")  # test_zero_partitioning.py
CTRL_C_EXIT_S = 30.0  # SIGINT to exit: pipeline close, servers' SIGTERM and their graceful stop


def test_short_soak_threads_flat_queue_bounded_no_leaked_servers(tmp_path, tiny_models):
    r = soak.run_soak(str(tmp_path), steps=20, teacher=tiny_models[0], student=tiny_models[1], save_every=10,
                      timeout_s=600, deepspeed_config=PARTITIONED)
    log = (tmp_path / "train.log").read_text()[-3000:]
    assert r["returncode"] == 0, log
    s = r["series"]
    assert s["step"] == list(range(1, 21)), s["step"]
    assert len(r["threads_second_half"]) == 1 and len(r["py_threads_second_half"]) == 1, \
        (s["sys/threads"], s["sys/py_threads"])
    assert max(s["pipeline/queue_depth"]) <= 2 and max(s["pipeline/staleness"]) <= 1, \
        (s["pipeline/queue_depth"], s["pipeline/staleness"])
    assert set(s["sys/children"]) == {2}, s["sys/children"]  # the two launched servers, no more, at every step
    assert len(r["servers"]) == 2 and r["children_alive_at_exit"] == [], r
    assert all(not procstat.alive(p) for p in [*r["servers"], *r["other_children"]])
    assert all(x > 0 for x in s["mem/rss_mb"]) and all(x > 0 for x in s["mem/children_rss_mb"])


def test_queue_bound_holds_when_the_trainer_lags():
    """A producer allowed the largest staleness there is (queue_size + 1, so only the queue holds it back) and a
    consumer that takes a batch every 50 ms and publishes its version: sampled every ms, the queue never holds
    more than queue_size batches and at most queue_size + 1 are built or being built."""
    pipe = _TimedPipeline(max_staleness=3, build_s=0.002).start()
    size = pipe.cfg.pipeline.queue_size
    depth, ahead, got = [], [], []
    try:
        for _ in range(20):
            t_end = time.perf_counter() + 0.05
            while time.perf_counter() < t_end:
                depth.append(pipe._queue.qsize())
                ahead.append(pipe.next_step - len(got))  # builds started minus batches taken
                time.sleep(0.001)
            got.append(pipe.get(timeout=10).step)
            pipe.publish_version(len(got))
    finally:
        pipe.close()
    assert got == list(range(20)), got
    assert max(depth) == size, max(depth)  # it does fill up ...
    assert max(ahead) <= size + 1, max(ahead)  # ... and the producer stops there


def test_pipeline_thread_count_does_not_grow_under_concurrent_blocking_work():
    """The soak's flat-threads check failed in CI (13 -> 14 kernel threads mid-run): asyncio's default executor
    starts a worker whenever none is idle, so the count depended on load. The pipeline's pool starts whole;
    bursts of concurrent to_thread calls (scoring, serialising, name lookups) leave the count where it was."""
    import asyncio

    pipe = _TimedPipeline(max_staleness=1)
    try:
        before = (procstat.status()["threads"], threading.active_count())

        async def burst(n):
            await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.02) for _ in range(n)))

        for n in (1, 2, 8, 40):  # 40: past any pool size (asyncio caps its own at 32)
            pipe.call(burst(n), timeout=60)
            assert (procstat.status()["threads"], threading.active_count()) == before, n
    finally:
        pipe.close()
    assert not pipe._thread.is_alive()


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                                (signal.SIGTERM, 143, "terminated (SIGTERM)")],
                         ids=["ctrl_c", "sigterm"])
def test_ctrl_c_exits_cleanly_and_stops_the_servers(tmp_path, tiny_models, signum, code, line):
    """Ctrl-C (or a scheduler's SIGTERM) stops at the next step boundary with a checkpoint of that step; before
    topd_ds/interrupt.py the KeyboardInterrupt (SystemExit) landed wherever the main thread was, and in CI once
    failed the clean-up (functorch's assert) and here hung it (TensorBoard)."""
    path = soak.write_config(str(tmp_path), *tiny_models, steps=1000, queue_size=2, max_staleness=1, save_every=2,
                              deepspeed_config=PARTITIONED)
    run_dir = tmp_path / "run"
    proc = start_interruptible([sys.executable, "-m", "topd_ds.cli", "train", "--config", path], cwd=REPO,
                               env=child_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        manifest = run_dir / "checkpoints" / "step-00000002" / "manifest.json"
        deadline = time.monotonic() + 300
        while not manifest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert manifest.exists(), proc.communicate(timeout=60)[1][-3000:]
        # the launched built-in servers among the trainer's children (a helper process such as Python's
        # multiprocessing resource tracker may sit beside them; once in CI a third child was there)
        children = procstat.children(proc.pid)
        servers = [p for p in children if soak.SERVER_MODULE in procstat.cmdline(p)]
        assert len(servers) == 2, [(p, procstat.cmdline(p)) for p in children]
        os.killpg(proc.pid, signum)  # what Ctrl-C in a terminal does: the foreground process group
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=CTRL_C_EXIT_S)
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = err.rstrip().splitlines()
    assert lines[-1] == f"topd-ds train: {line}", err[-1000:]
    stopped = [line for line in lines if line.startswith("stopped at step ")]
    assert len(stopped) == 1 and stopped[0].endswith("(continue with --resume auto)"), err[-1000:]
    step = int(stopped[0].split()[3].rstrip(","))
    assert step >= 2 and (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists(), stopped
    assert exit_s < CTRL_C_EXIT_S
    assert [p for p in servers if procstat.alive(p)] == [], servers
    junk = [os.path.join(d, n) for d, dirs, files in os.walk(run_dir) for n in dirs + files if ".tmp" in n]
    assert junk == [], junk
    print(f"Ctrl-C to exit: {exit_s:.1f} s")


def test_procstat_counts_threads_children_and_zombies():
    """procstat against what the test itself creates: one more thread, one child (alive, zombie, reaped)."""
    before = procstat.usage()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    child = subprocess.Popen(["sleep", "30"])
    try:
        during = procstat.usage()
        assert during["sys/threads"] == before["sys/threads"] + 1
        assert during["sys/py_threads"] == before["sys/py_threads"] + 1
        assert child.pid in procstat.children() and procstat.alive(child.pid)
        assert during["sys/children"] == before["sys/children"] + 1 and during["mem/children_rss_mb"] > 0
        with open(f"/proc/{os.getpid()}/status") as f:  # an independent read of the same field
            rss_kb = int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
        assert abs(procstat.status()["rss_mb"] - rss_kb / 1024) < 64  # the interpreter allocates in between
    finally:
        stop.set()
        thread.join()
        child.kill()
    deadline = time.monotonic() + 10
    # the kernel frees the memory before the state turns Z: wait for the state, not for RSS 0
    while procstat.alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert procstat.status(child.pid) is not None  # still in /proc: a zombie, not yet reaped
    assert not procstat.alive(child.pid) and child.pid not in procstat.children()  # a zombie is not alive
    child.wait()
    assert procstat.status(child.pid) is None and not procstat.alive(child.pid)


LEAVE_PROBE = """
import atexit, sys
import torch.distributed as dist
# registered first, so it runs last: after every atexit handler the trainer registered
atexit.register(lambda: print("process group alive at exit:", dist.is_initialized(), flush=True))
from topd_ds.cli import main
sys.exit(main(["train", "--config", sys.argv[1], "--resume", "none"]))
"""


def test_finished_run_destroys_its_process_groups_at_exit(tmp_path, tiny_models):
    """A gloo group alive at interpreter exit can abort a finished job (SIGABRT; comm/distributed.leave_at_exit):
    after a finished `topd-ds train` no process group may be left for finalization (the old trainer left it)."""
    path = soak.write_config(str(tmp_path), *tiny_models, steps=2, queue_size=2, max_staleness=1, save_every=0,
                             deepspeed_config=PARTITIONED)
    out = subprocess.run([sys.executable, "-c", LEAVE_PROBE, path], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "process group alive at exit: False" in out.stdout, out.stdout[-2000:]
