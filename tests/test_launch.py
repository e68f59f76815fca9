"""The launch scripts themselves, with the real `deepspeed` launcher: 2 CPU ranks (gloo) under ZeRO-3.

    scripts/train_single_node.sh   TRAIN_GPUS=0,1 -> deepspeed --include localhost:0,1 --module topd_ds.train
    scripts/train_multi_node.sh    a hostfile "localhost slots=2" -> deepspeed --hostfile ... --include ...

Each run gets an empty TORCH_EXTENSIONS_DIR, as on a fresh clone: the trainer must not JIT-compile DeepSpeed's
shm op (45 s per fresh machine; topd_ds.comm.distributed.init_distributed skips it on the CPU), so the directory
stays empty. These are among the slowest tests (a launcher, two ranks, two built-in servers each).
"""

import os
import socket
import subprocess
import sys
import tempfile

import pytest
import yaml

from topd_ds.tasks.arith import make_splits, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("launch")
    train, evals = make_splits(64, 8, seed=5, depth=2)
    write_jsonl(str(root / "train.jsonl"), train)
    write_jsonl(str(root / "eval.jsonl"), evals)
    return root


def write_config(root, tiny_models, name, **over):
    cfg = {
        "model": {"teacher": tiny_models[0], "student": tiny_models[1]},
        "data": {"prompts": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_prompt_tokens": 64},
        "rollout": {"n_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 12},
        "topd": {"mode": "topd", "window": 6, "candidate_fraction": 0.25},
        "ot": {"solver": "exact"},
        "pipeline": {"max_staleness": 0},
        "train": {"stage": "opd", "deepspeed_config": os.path.join(REPO, "tests/ds_zero3_partitioned.json"), "steps": 2,
                  "lr": 1e-2, "global_batch_size": 4, "micro_batch_size": 1, "eval_samples": 4,
                  "out_dir": str(root / "runs"), "run_name": name},
    }
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def launch_env(config, root, **env):
    """(environment, extensions dir) of a launch script run with 2 CPU ranks, as a user's shell would have it."""
    ext = tempfile.mkdtemp(prefix=f"torch_extensions_{os.path.basename(config)}_", dir=root)  # one per run
    full_env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    full_env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TRAIN_GPUS="0,1", MASTER_PORT=str(free_port()),
                    TORCH_EXTENSIONS_DIR=str(ext), DEEPSPEED=os.path.join(os.path.dirname(sys.executable), "deepspeed"),
                    PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
                    PYTHONUNBUFFERED="1")
    full_env.update(env)
    return full_env, ext


def launch(script, config, root, *overrides, **env):
    """Run a launch script as a user would, with 2 CPU ranks; returns (completed process, extensions dir)."""
    full_env, ext = launch_env(config, root, **env)
    # its own session: a test that SIGKILLs the launcher's process group (tests/kill_hook) must not reach pytest
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", script), config, *overrides], cwd=REPO,
                         env=full_env, capture_output=True, text=True, timeout=600, start_new_session=True)
    return out, ext


def summary(root, name):
    import json

    with open(root / "runs" / name / "summary.json") as f:
        return json.load(f)


# 4 steps with a sharded checkpoint after step 2: the uninterrupted reference of the kill-and-resume test below
SINGLE = {"train": {"steps": 4, "save_every": 2}}


@pytest.fixture(scope="module")
def single_run(workdir, tiny_models):
    """The uninterrupted 2-rank run of scripts/train_single_node.sh: (completed process, extensions dir)."""
    return launch("train_single_node.sh", write_config(workdir, tiny_models, "single", **SINGLE), workdir)


def test_single_node_script_trains_two_ranks(workdir, single_run):
    """scripts/train_single_node.sh with TRAIN_GPUS=0,1: the real launcher starts 2 ranks, ZeRO-3 shards the
    student over them, both train 4 TOPD steps, rank 0 exports; nothing is JIT-compiled."""
    out, ext = single_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "--include localhost:0,1" in log or "'localhost': [0, 1]" in log
    assert "world=2" in log
    s = summary(workdir, "single")
    assert [h["step"] for h in s["history"]] == [1, 2, 3, 4]
    assert "loss/traj" in s["history"][-1] or s["history"][-1].get("tokens/traj_windows", 0) == 0
    assert os.path.isfile(workdir / "runs" / "single" / "final" / "config.json")
    assert os.listdir(ext) == [], f"DeepSpeed compiled an op on a fresh machine: {os.listdir(ext)}"


def test_two_ranks_killed_after_a_sharded_checkpoint_resume_bit_for_bit(workdir, tiny_models, single_run):
    """The same 2-rank run, SIGKILLed (launcher and both ranks at once, tests/kill_hook) right after the step-2
    checkpoint, whose ZeRO-3 optimizer and parameter state is one shard per rank; `--resume auto` through the
    launcher loads each rank's shard and steps 3-4 have the losses of the uninterrupted run bit for bit."""
    assert single_run[0].returncode == 0, single_run[0].stderr[-3000:]
    reference = {h["step"]: h for h in summary(workdir, "single")["history"]}
    config = write_config(workdir, tiny_models, "killed", **SINGLE)
    hook = os.path.join(REPO, "tests", "kill_hook")
    out, _ = launch("train_single_node.sh", config, workdir, TOPD_TEST_KILL_AFTER_CHECKPOINT="2",
                    PYTHONPATH=os.pathsep.join([hook, REPO]))
    run = workdir / "runs" / "killed"
    assert out.returncode != 0 and not (run / "summary.json").exists(), out.stderr[-3000:]
    assert sorted(os.listdir(run / "checkpoints")) == ["step-00000002"]  # killed before anything later
    shards = sorted(os.listdir(run / "checkpoints" / "step-00000002" / "ds" / "ds"))
    for r in (0, 1):  # each rank's partition of the parameters and of the optimizer state
        assert any(f"zero_pp_rank_{r}_" in n and n.endswith("model_states.pt") for n in shards), shards
        assert any(f"zero_pp_rank_{r}_" in n and "optim_states" in n for n in shards), shards
    out, ext = launch("train_single_node.sh", config, workdir, "--resume", "auto")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    resumed = {h["step"]: h for h in summary(workdir, "killed")["history"]}
    assert {3, 4} <= set(resumed), sorted(resumed)
    for step in (3, 4):
        for key in ("loss/total", "loss/opd", "train/grad_norm"):
            assert resumed[step][key] == reference[step][key], (step, key, resumed[step][key], reference[step][key])
    assert os.listdir(ext) == []


def test_multi_node_script_with_a_one_host_hostfile(workdir, tiny_models):
    """scripts/train_multi_node.sh with the hostfile "localhost slots=2": the hostfile path of the launcher
    (--hostfile plus --include HOST:TRAIN_GPUS), 2 ranks, 2 steps of stage 1 (KD on the data's responses, the
    teacher's hidden states scored by rank 0 while the other rank waits for it)."""
    hostfile = workdir / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # the one end-to-end run on the shipped ZeRO JSON unchanged (the others partition the tiny student:
    # tests/ds_zero3_partitioned.json), since users run it
    config = write_config(workdir, tiny_models, "multi", kd={"source": "dataset", "n_samples": 16},
                          train={"stage": "kd", "deepspeed_config": os.path.join(REPO, "ds_configs/zero3.json")})
    out, ext = launch("train_multi_node.sh", config, workdir, HOSTFILE=str(hostfile))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "world=2" in out.stdout + out.stderr
    history = summary(workdir, "multi")["history"]
    assert [h["step"] for h in history] == [1, 2] and all(h["loss/kd"] > 0 for h in history)
    assert os.listdir(ext) == []


def test_wrong_rank_count_stops_before_any_model_is_loaded(workdir, tiny_models):
    """2 ranks for a global batch of 3: one error line per rank naming the fix, before servers or models."""
    config = write_config(workdir, tiny_models, "three", rollout={"prompts_per_step": 3, "n_per_prompt": 1},
                          train={"global_batch_size": 3})
    out, _ = launch("train_single_node.sh", config, workdir)
    assert out.returncode != 0
    log = out.stdout + out.stderr
    assert "topd-ds train: error: train.global_batch_size: 3 does not split over 2 rank(s)" in log
    assert "rank count in [1, 3]" in log and "Traceback" not in log
    assert "started built-in" not in log and not (workdir / "runs" / "three").exists()


def test_ctrl_c_under_the_launcher_stops_both_ranks_at_one_step_with_a_checkpoint(workdir, tiny_models):
    """Ctrl-C in the terminal of a launched job: SIGINT to the whole process group (bash, the launcher, both ranks),
    and the launcher answers it with SIGTERM to every rank and server at once (deepspeed/launcher/launch.py:121-132,
    251-270; SIGKILL after 30 s). Both ranks must leave at the same step boundary with a checkpoint of that step,
    one shard each (topd_ds/interrupt.py), in well under the launcher's 30 s; before, each rank raised
    KeyboardInterrupt wherever it was and no checkpoint of the stopped step was written."""
    import signal
    import time

    from test_train_e2e import start_interruptible

    from topd_ds import procstat

    config = write_config(workdir, tiny_models, "ctrl_c", train={"steps": 1000, "save_every": 2})
    env, _ = launch_env(config, workdir)
    proc = start_interruptible(["bash", os.path.join(REPO, "scripts", "train_single_node.sh"), config], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = workdir / "runs" / "ctrl_c"
    try:
        manifest = run / "checkpoints" / "step-00000002" / "manifest.json"
        deadline = time.monotonic() + 300
        while not manifest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert manifest.exists(), proc.communicate(timeout=60)[0][-3000:]
        tree, todo = [], [proc.pid]  # the launcher, both ranks, the servers rank 0 started
        while todo:
            kids = procstat.children(todo.pop())
            tree += kids
            todo += kids
        assert len(tree) >= 5, [(p, procstat.cmdline(p)) for p in tree]
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        log, _ = proc.communicate(timeout=120)
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stopped = [line for line in log.splitlines() if "stopped at step " in line]
    assert len(stopped) == 1 and "(continue with --resume auto)" in stopped[0], log[-3000:]
    step = int(stopped[0].split("stopped at step ")[1].split(",")[0])
    shards = sorted(os.listdir(run / "checkpoints" / f"step-{step:08d}" / "ds" / "ds"))
    for r in (0, 1):
        assert any(f"zero_pp_rank_{r}_" in n and "optim_states" in n for n in shards), shards
    assert log.count("topd-ds train: interrupted (Ctrl-C)") == 2, log[-3000:]  # one per rank
    # the one traceback is the deepspeed runner's own (runner.py:634 waits without a SIGINT handler), not a rank's
    tracebacks = log.split("Traceback (most recent call last):")[1:]
    assert all("/bin/deepspeed" in t.split("\n", 2)[1] for t in tracebacks), log[-3000:]
    assert exit_s < 30, exit_s  # before the launcher's SIGKILL
    deadline = time.monotonic() + 10  # bash is reaped; what it started may still be on its way out
    while [p for p in tree if procstat.alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in tree if procstat.alive(p)] == [], [(p, procstat.cmdline(p)) for p in tree if procstat.alive(p)]
    assert not [n for d, dirs, files in os.walk(run) for n in dirs + files if ".tmp" in n]
