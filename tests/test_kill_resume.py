"""kill -9 at several positions, then `--resume auto` (issue 8 promise 1; docs/RELIABILITY.md section 1).

One uninterrupted reference run and one run that is killed with SIGKILL three times, each time resumed
with `--resume auto` (7 steps of TOPD, a checkpoint every step, synchronous pipeline `max_staleness: 0`,
tiny models, built-in servers, `topd-ds train` as a child process):

    segment A  fresh              killed DURING the step-2 checkpoint write: DeepSpeed's shards and the
                                  export are in checkpoints/.tmp-step-00000002/, no state.json, no manifest
    segment B  resumes step 1     killed DURING the step-4 weight sync: the student is written in
                                  sync/.tmp-step-00000004-*/, not yet renamed to sync/step-00000004
    segment C  resumes step 3     killed at a random step K in 5..7, in a random phase (batch ready but not
                                  trained / in the backward / right after the optimizer update), both drawn
                                  from a fresh seed that every assertion message prints
    segment D  resumes step K-1   runs to the end

The kills are real SIGKILLs (no `finally`, no atexit), sent by the trainer to itself at the exact position:
the child runs `python -c CHILD`, which wraps one function (`topd_ds.comm.distributed.atomic_dir`, `Pipeline.get`,
the engine's `backward` / `step`) and then runs `topd-ds train` unchanged. Polling the run dir from outside
and killing when a `.tmp-*` appears races with a write of a few ms on a loaded 2-core machine; this
cannot miss, and each test first asserts that the kill happened where intended.

For each case: the launched servers exit (`--exit-with-parent`); the next segment resumes from the newest
complete checkpoint, removes what the kill left half-written (and nothing is left at the end); the losses
that segment computed equal the reference's bit for bit. Reproduce a random case with TOPD_KILL_SEED=<seed>.
"""

import json
import os
import random
import subprocess
import sys
import time

import pytest
from test_train_e2e import child_env, dump, write_config

from topd_ds import checkpoint, procstat
from topd_ds.tasks.arith import make_splits, write_jsonl

STEPS = 7
PHASES = ("batch-ready", "backward", "optimizer-step")

# Runs in the child before `topd-ds train`: SIGKILL this process at the position named by TOPD_TEST_KILL_AT,
# after writing the pids of its children (the launched servers) to TOPD_TEST_KILL_REPORT.
CHILD = r"""
import contextlib, json, os, signal, sys
from topd_ds.comm import distributed as ds
from topd_ds import procstat
from topd_ds.rollout.pipeline import Pipeline

kind, _, where = os.environ["TOPD_TEST_KILL_AT"].partition(":")

def die():
    with open(os.environ["TOPD_TEST_KILL_REPORT"], "w") as f:
        json.dump({"servers": procstat.children()}, f)
    os.kill(os.getpid(), signal.SIGKILL)

if kind == "dir":  # inside atomic_dir(path): everything written to its temp dir, not yet renamed
    real_atomic_dir = ds.atomic_dir
    @contextlib.contextmanager
    def atomic_dir(path):
        with real_atomic_dir(path) as tmp:
            yield tmp
            if path.endswith(where):
                die()
    ds.atomic_dir = atomic_dir
elif kind == "step":  # "step:K:phase"
    k, phase = where.split(":")
    k, current = int(k), [0]
    real_get, real_build = Pipeline.get, ds.build_engine
    def get(self, *args, **kwargs):
        batch = real_get(self, *args, **kwargs)
        current[0] = batch.step + 1  # batch.step counts steps done before it
        if phase == "batch-ready" and current[0] == k:
            die()
        return batch
    def build_engine(*args, **kwargs):
        engine = real_build(*args, **kwargs)
        real_backward, real_step = engine.backward, engine.step
        def backward(loss):
            if phase == "backward" and current[0] == k:
                die()
            return real_backward(loss)
        def step():
            boundary = engine.is_gradient_accumulation_boundary()  # this micro-batch applies the update
            real_step()
            if phase == "optimizer-step" and boundary and current[0] == k:
                die()
        engine.backward, engine.step = backward, step
        return engine
    Pipeline.get, ds.build_engine = get, build_engine

from topd_ds.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("kill")
    train, _ = make_splits(64, 8, seed=11, depth=2)
    write_jsonl(str(root / "train.jsonl"), train)
    (root / "eval.jsonl").write_text("")  # write_config names one; the runs here set no eval file
    return root


def config(root, name, tiny_models):
    # the syncs in the run dir (not /dev/shm, train.sync_dir auto's choice here), where the kills below look for them
    cfg = write_config(root, name, mode="topd", steps=STEPS, save_every=1,
                       sync_dir=str(root / "runs" / name / "sync"))
    del cfg["data"]["eval"]
    return dump(root, name, cfg, tiny_models)


def train(path, root, tag, *, kill_at=None, resume="auto"):
    """Run `topd-ds train` to completion or to its kill; returns (returncode, stdout, stderr, kill report)."""
    report = root / f"{tag}.kill.json"
    env = child_env(PYTHONUNBUFFERED="1", TOPD_TEST_KILL_AT=kill_at or "none:", TOPD_TEST_KILL_REPORT=str(report))
    out = subprocess.run([sys.executable, "-c", CHILD, "train", "--config", path, "--resume", resume],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    servers = json.loads(report.read_text())["servers"] if report.exists() else []
    return out.returncode, out.stdout, out.stderr, servers


def losses(history):
    """step -> every loss term and the grad norm of that step (floats as logged)."""
    return {h["step"]: {k: v for k, v in h.items() if k.startswith("loss/") or k == "train/grad_norm"}
            for h in history}


def leftovers(run_dir):
    return sorted(os.path.relpath(os.path.join(d, n), run_dir) for d, dirs, files in os.walk(run_dir)
                  for n in dirs + files if n.startswith(".tmp-") or ".tmp" in n and n.rpartition(".tmp")[2].isdigit())


def wait_gone(pids, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(procstat.alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if procstat.alive(p)]


@pytest.fixture(scope="module")
def reference(workdir, tiny_models):
    code, _, err, _ = train(config(workdir, "reference", tiny_models), workdir, "reference")
    assert code == 0, err[-3000:]
    with open(workdir / "runs" / "reference" / "summary.json") as f:
        return losses(json.load(f)["history"])


@pytest.fixture(scope="module")
def chain(workdir, tiny_models):
    """Segments A-D on one run dir: per segment its exit code, output, the servers it had launched when it
    was killed, and what it left on disk; plus the final losses."""
    seed = int(os.environ.get("TOPD_KILL_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    k, phase = rng.choice(range(5, STEPS + 1)), rng.choice(PHASES)
    print(f"random kill: TOPD_KILL_SEED={seed} -> step {k}, {phase}")
    path = config(workdir, "killed", tiny_models)
    run_dir = workdir / "runs" / "killed"
    kills = ["dir:checkpoints/.tmp-step-00000002/export", "dir:sync/step-00000004", f"step:{k}:{phase}", None]
    runs = []
    for i, kill_at in enumerate(kills):
        code, out, err, servers = train(path, workdir, f"segment{i}", kill_at=kill_at)
        intact = [c for c in checkpoint.list_checkpoints(str(run_dir)) if checkpoint.verify(c) is None]
        tmp = run_dir / "checkpoints" / ".tmp-step-00000002"
        runs.append({"code": code, "stdout": out, "stderr": err[-3000:], "servers": servers,
                     "servers_left": wait_gone(servers), "leftovers": leftovers(run_dir),
                     "newest": os.path.basename(intact[-1]) if intact else None,
                     "tmp_step2": sorted(os.listdir(tmp)) if tmp.is_dir() else None})
    final = {}
    if runs[-1]["code"] == 0:
        with open(run_dir / "summary.json") as f:
            final = losses(json.load(f)["history"])
    return {"seed": seed, "k": k, "phase": phase, "runs": runs, "losses": final, "run_dir": str(run_dir)}


def check_case(chain, reference, i, *, junk, removed, resume_step, steps):
    """Segment i was SIGKILLed where intended (`junk` prefixes half-written, newest intact checkpoint
    `resume_step`) and its servers went away; segment i+1 removed `removed`, resumed from `resume_step`, and
    its losses for `steps` equal the reference's bit for bit."""
    killed, nxt = chain["runs"][i], chain["runs"][i + 1]
    where = f"(TOPD_KILL_SEED={chain['seed']}: random kill at step {chain['k']}, {chain['phase']})"
    assert killed["code"] == -9, f"segment {i} was not SIGKILLed (exit {killed['code']}) {where}\n{killed['stderr']}"
    assert len(killed["servers"]) == 2 and not killed["servers_left"], \
        f"launched servers {killed['servers']} still alive after the kill: {killed['servers_left']}"
    for name in junk:
        assert any(x.startswith(name) for x in killed["leftovers"]), f"no {name}* left: {killed['leftovers']} {where}"
    assert killed["newest"] == f"step-{resume_step:08d}", (killed["newest"], where)
    assert nxt["code"] in (0, -9), f"segment {i + 1} failed (exit {nxt['code']}) {where}\n{nxt['stderr']}"
    ckpt = os.path.join(chain["run_dir"], "checkpoints", f"step-{resume_step:08d}")
    assert f"resumed from {ckpt} at step {resume_step}\n" in nxt["stdout"], (nxt["stdout"][-2000:], where)
    for name in removed:
        assert f"removed {os.path.join(chain['run_dir'], name)}\n" in nxt["stdout"], (name, nxt["stdout"][-2000:])
    assert chain["losses"], f"the last segment did not finish {where}\n{chain['runs'][-1]['stderr']}"
    assert set(steps) <= set(chain["losses"]) and len(steps) > 0, (steps, sorted(chain["losses"]))
    for step in steps:
        assert chain["losses"][step] == reference[step], \
            f"step {step}: {chain['losses'][step]} != reference {reference[step]} {where}"


def test_kill_during_checkpoint_write(chain, reference):
    """Killed inside checkpoint.save of step 2 (shards and export in .tmp-step-00000002, no manifest)."""
    check_case(chain, reference, 0, junk=["checkpoints/.tmp-step-00000002"], removed=["checkpoints/.tmp-step-00000002"],
               resume_step=1, steps=[2, 3])
    written = chain["runs"][0]["tmp_step2"]  # half-way: DeepSpeed's part and the export's temp dir, nothing after
    assert "ds" in written and any(n.startswith(".tmp-export-") for n in written), written
    assert not {"state.json", "manifest.json", "export", "rng_rank0.pt"} & set(written), written


def test_kill_during_weight_sync(chain, reference):
    """Killed inside the step-4 weight sync (student written to sync/.tmp-step-00000004-*, not renamed)."""
    check_case(chain, reference, 1, junk=["sync/.tmp-step-00000004-"], removed=["sync"], resume_step=3,
               steps=range(4, chain["k"]))


def test_kill_at_a_random_step(chain, reference):
    """Killed at step K, in a random phase; the last segment resumes from K-1 and finishes the run."""
    k = chain["k"]
    check_case(chain, reference, 2, junk=[], removed=[], resume_step=k - 1, steps=range(k, STEPS + 1))
    assert chain["runs"][3]["code"] == 0 and not chain["runs"][3]["leftovers"], chain["runs"][3]["leftovers"]
    assert chain["losses"] == reference, f"TOPD_KILL_SEED={chain['seed']}: {chain['losses']} != {reference}"


def test_remove_stale_takes_only_what_a_killed_run_left(tmp_path):
    """remove_stale: temp dirs and `*.tmp<pid>` files in the run dir and checkpoints/, and sync/; nothing else."""
    run = tmp_path / "run"
    junk = ["checkpoints/.tmp-step-00000004", "sync", ".tmp-final-x1y2", "config.json.tmp4242",
            "checkpoints/.tmp-step-00000003.old"]
    kept = ["checkpoints/step-00000003/manifest.json", "config.json", "summary.json", "servers.json",
            "tb/events.out.tfevents.1", "final/config.json", "notes.tmp", "checkpoints/step-00000003/x.tmp12"]
    for rel in junk + ["sync/.tmp-step-00000005-ab/model.safetensors", "checkpoints/.tmp-step-00000004/ds/a.pt"]:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        if not rel.endswith(("00000004", "sync", "x1y2", ".old")):
            (run / rel).write_text("x")
        else:
            (run / rel).mkdir(exist_ok=True)
    for rel in kept:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x")
    removed = checkpoint.remove_stale(str(run))
    assert sorted(removed) == sorted(str(run / rel) for rel in junk)
    assert all(not (run / rel).exists() for rel in junk)
    assert all((run / rel).is_file() for rel in kept)  # inside a step-* checkpoint nothing is touched
    assert checkpoint.remove_stale(str(run)) == [] and checkpoint.remove_stale(str(tmp_path / "none")) == []
