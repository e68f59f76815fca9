"""End to end: the trainer on tiny models with built-in servers over HTTP and a real DeepSpeed ZeRO-3 engine.

One process (in pytest's process: world size 1, gloo); two ranks through the real launcher are in test_launch.py. These are the
slowest tests of the suite (~1-2 minutes together); they check what only a whole run can show.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from topd_ds.tasks.arith import make_splits, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An in-process run (test_topd_run_one_process) sets these in pytest's environment and keeps MASTER_PORT
# bound: a child trainer must pick its own rendezvous, not inherit a port in use.
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per value); the step-1 loss differed from float32 by
# 6.7e-4 relative (test_bf16_zero3_steps_on_the_cpu, 2026-12-06, 2-core CPU); the bound has a 7.5x margin
BF16_LOSS_RTOL = 5e-3
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra):
    return {**{k: v for k, v in os.environ.items() if k not in RANK_VARS}, **extra}


def start_interruptible(cmd, **popen_kwargs):
    """Popen in its own session that a SIGINT can reach: a pytest started by a shell's `&` ignores SIGINT, and an
    ignored signal stays ignored across exec (a handled one is reset to the default), so the child is started while
    this process handles SIGINT."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("e2e")
    train, evals = make_splits(64, 8, seed=5, depth=2)
    write_jsonl(str(root / "train.jsonl"), train)
    write_jsonl(str(root / "eval.jsonl"), evals)
    return root


def write_config(root, name, *, mode="topd", steps=2, **train):
    cfg = {
        "data": {"prompts": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_prompt_tokens": 64},
        "rollout": {"n_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 12},
        "topd": {"mode": mode, "window": 6, "candidate_fraction": 0.25},
        "ot": {"solver": "exact"},
        "pipeline": {"max_staleness": 0},
        # every parameter partitioned, as on a 4B student (test_zero_partitioning.py)
        "train": {"stage": "opd", "deepspeed_config": os.path.join(REPO, "tests/ds_zero3_partitioned.json"),
                  "steps": steps,
                  "lr": 1e-2, "global_batch_size": 4, "micro_batch_size": 2, "eval_samples": 4,
                  "out_dir": str(root / "runs"), "run_name": name, **train},
    }
    return cfg


def dump(root, name, cfg, tiny_models):
    """Write the YAML with the session's tiny teacher and student."""
    cfg["model"] = {"teacher": tiny_models[0], "student": tiny_models[1]}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def summary(root, name):
    with open(root / "runs" / name / "summary.json") as f:
        return json.load(f)


def test_topd_run_one_process(workdir, tiny_models):
    """A TOPD run under ZeRO-3 produces every loss term, logs, an export that transformers loads, and a
    student server whose logprobs after the final weight sync equal the export's."""
    from transformers import AutoModelForCausalLM

    from topd_ds.engines.launch import launch_server
    from topd_ds.engines.sglang import SGLangClient
    from topd_ds.train import main

    cfg = write_config(workdir, "topd1", steps=2, save_every=1)
    # one prompt over max_prompt_tokens=64: skipped and counted (issue 17), the run goes on
    with open(workdir / "train.jsonl") as f, open(workdir / "train_long.jsonl", "w") as g:
        g.write(f.read() + json.dumps({"prompt": "1+" * 40 + "1="}) + "\n")
    cfg["data"]["prompts"] = str(workdir / "train_long.jsonl")
    with launch_server(tiny_models[1]) as server:
        cfg["student_server"] = {"urls": [server.url]}
        assert main(["--config", dump(workdir, "topd1", cfg, tiny_models)]) == 0
        s = summary(workdir, "topd1")
        last = s["history"][-1]
        for key in ("loss/opd", "loss/traj", "loss/total", "train/grad_norm", "pipeline/false_alarm_frac",
                    "time/probing_s", "time/ot_s", "pipeline/staleness"):
            assert key in last, key
        assert last["loss/total"] == pytest.approx(last["loss/opd"] + last["loss/traj"], rel=1e-5)
        assert set(s["eval"]) == {"0", "2"}
        run = workdir / "runs" / "topd1"
        assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "tb"))
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tb")).Reload()
        assert [e.value for e in events.Scalars("data/long_prompts_skipped")] == [1.0, 1.0]
        export = AutoModelForCausalLM.from_pretrained(str(run / "final")).eval()
        seq = [1, 9, 14, 10, 19, 11]

        async def score():
            client = SGLangClient([server.url])
            try:
                return (await client.score([seq], start=1))[0], await client.weight_version()
            finally:
                await client.close()

        scores, version = asyncio.run(score())
        assert version == "2"
        with torch.no_grad():
            lp = torch.log_softmax(export(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        ref = [float(lp[t - 1, seq[t]]) for t in range(1, len(seq))]
        got = scores.token_logprobs[-len(ref):]
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (got, ref)
        # the exported student changed: training did something
        start = AutoModelForCausalLM.from_pretrained(tiny_models[1]).eval()
        moved = sum(float((a - b).abs().sum().detach()) for a, b in zip(start.parameters(), export.parameters()))
        assert moved > 0


def train_child(path, *extra):
    """`topd-ds train --config path` in a child process; fails the test on a non-zero exit."""
    out = subprocess.run([sys.executable, "-m", "topd_ds.cli", "train", "--config", path, *extra],
                         env=child_env(PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def full_run(workdir, tiny_models):
    """An uninterrupted float32 run of 4 OPD steps (checkpoint at step 2): its summary's history."""
    cfg = write_config(workdir, "full", mode="opd_dw_low_ot", steps=4, save_every=2)
    train_child(dump(workdir, "full", cfg, tiny_models))
    return summary(workdir, "full")["history"]


def test_kill_and_resume_reproduces_the_losses(workdir, tiny_models, full_run):
    """SIGKILL right after the step-2 checkpoint, `--resume auto`, and steps 3-4 have the same losses as an
    uninterrupted run (synchronous pipeline, seeded sampling, restored RNG states)."""
    reference = {h["step"]: h["loss/total"] for h in full_run}
    cfg = write_config(workdir, "killed", mode="opd_dw_low_ot", steps=4, save_every=2)
    path = dump(workdir, "killed", cfg, tiny_models)
    # the trainer kills itself once the step-2 checkpoint is complete (tests/kill_hook): polling for the
    # manifest from here raced with the step-4 checkpoint on a loaded machine
    hook = os.path.join(REPO, "tests", "kill_hook")
    env = child_env(PYTHONUNBUFFERED="1", TOPD_TEST_KILL_AFTER_CHECKPOINT="2",
                    PYTHONPATH=os.pathsep.join([hook] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, "-m", "topd_ds.cli", "train", "--config", path], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600,
                         start_new_session=True)  # the hook kills its process group: not pytest's
    assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr[-3000:])
    run = workdir / "runs" / "killed"
    assert os.listdir(run / "checkpoints") == ["step-00000002"] and not (run / "summary.json").exists()
    train_child(path, "--resume", "auto")
    resumed = {h["step"]: h["loss/total"] for h in summary(workdir, "killed")["history"]}
    assert {3, 4} <= set(resumed)
    for step in (3, 4):
        assert resumed[step] == reference[step], (step, resumed, reference)


def test_bf16_zero3_steps_on_the_cpu(workdir, tiny_models, full_run):
    """model.dtype bfloat16 on the CPU (DeepSpeed's CPU accelerator supports bf16): two partitioned ZeRO-3
    steps train; the step-1 loss (same batch: the servers sample in float32 until the first sync) is the
    float32 run's within bf16 rounding, and not bit-equal to it (bf16 really ran); the weights synced to the
    student server after step 1 were written in bf16 (the export is float32 either way)."""
    cfg = write_config(workdir, "bf16", mode="opd_dw_low_ot", steps=2, save_every=2)
    path = dump(workdir, "bf16", cfg, tiny_models)
    train_child(path, "model.dtype=bfloat16")
    history = summary(workdir, "bf16")["history"]
    assert [h["step"] for h in history] == [1, 2]
    got, ref = history[0]["loss/total"], full_run[0]["loss/total"]
    print(f"bf16 step-1 loss {got!r}, float32 {ref!r}, relative difference {abs(got - ref) / abs(ref):.3g}")
    assert got != ref and abs(got - ref) <= BF16_LOSS_RTOL * abs(ref), (got, ref)
    # 2 bytes a parameter instead of 4 (plus the same file headers)
    assert history[0]["sync/bytes"] < 0.6 * full_run[0]["sync/bytes"], (history[0], full_run[0])


def test_stage1_reads_the_sampled_responses(workdir, tiny_models):
    """Stage 1 without the teacher's responses stops with one line naming `topd-ds sample`, before any model
    is loaded; after `topd-ds sample` it trains on exactly the records of that file."""
    from topd_ds.errors import ConfigError
    from topd_ds.stage1.sample import main as sample_main, read_records
    from topd_ds.train import main

    cfg = write_config(workdir, "kd", steps=2)
    cfg["train"]["stage"] = "kd"
    cfg["kd"] = {"n_samples": 6, "max_new_tokens": 8}
    samples = workdir / "kd_samples.jsonl"
    cfg["data"]["responses"] = str(samples)
    path = dump(workdir, "kd", cfg, tiny_models)
    with pytest.raises(ConfigError) as err:
        main(["--config", path])
    assert str(err.value) == (f"data.responses: {samples} does not exist; stage 1 trains on the teacher's "
                              f"responses: sample them first with `topd-ds sample --config {path}` (it resumes "
                              f"where it stopped)")
    assert not (workdir / "runs" / "kd" / "checkpoints").exists()
    assert sample_main(["--config", path]) == 0
    records, _ = read_records(str(samples))
    assert sorted(r["index"] for r in records) == list(range(6))
    assert main(["--config", path]) == 0
    history = summary(workdir, "kd")["history"]
    assert [h["step"] for h in history] == [1, 2] and all(h["loss/kd"] > 0 for h in history)


def test_user_given_student_server_is_loaded_with_the_starting_weights(workdir, tiny_models, tmp_path):
    """A student server the trainer did not start may hold other weights (e.g. a killed run's newest sync):
    the trainer loads the weights it starts from, so the losses equal a run on built-in servers bit for bit."""
    import shutil

    import transformers

    from topd_ds.engines.launch import launch_server
    from topd_ds.engines.sglang import SGLangClient

    env = child_env(PYTHONUNBUFFERED="1")

    def run(name, **extra):
        cfg = write_config(workdir, name, mode="opd", steps=2)
        cfg.update(extra)
        out = subprocess.run([sys.executable, "-m", "topd_ds.cli", "train", "--config",
                              dump(workdir, name, cfg, tiny_models)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return [h["loss/total"] for h in summary(workdir, name)["history"]]

    reference = run("builtin-student")
    stale = tmp_path / "stale"
    shutil.copytree(tiny_models[1], stale)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(stale))
    # one request per batch, as the trainer's own built-in servers: answers never depend on what else arrived
    with launch_server(tiny_models[1], batch_window_ms=0) as server:
        async def load_stale():
            client = SGLangClient([server.url])
            try:
                await client.update_weights(str(stale), "stale")
            finally:
                await client.close()
        asyncio.run(load_stale())
        losses = run("user-student", student_server={"urls": [server.url]})
    assert losses == reference


def test_a_bad_row_met_mid_run_stops_with_one_line_and_a_checkpoint(workdir, tiny_models):
    """Rows past data.check_rows are read when drawn: a malformed one stops the run like a server failure
    (every rank leaves at the same step, the weights are saved), with the loader's line naming file and row."""
    from topd_ds.errors import TopdError
    from topd_ds.train import main

    prompts = workdir / "late_bad.jsonl"
    prompts.write_text('{"prompt": "1+2="}\n{"prompt": "3+4=", "oops"}\n{"prompt": 7}\n')
    cfg = write_config(workdir, "latebad", steps=2)
    cfg["data"].update(prompts=str(prompts), check_rows=1, eval=None)
    with pytest.raises(TopdError) as err:
        main(["--config", dump(workdir, "latebad", cfg, tiny_models)])
    message = str(err.value)
    assert message.startswith(f"{prompts}:") and "stopped at step 0, checkpoint saved:" in message, message
    assert "\n" not in message
    assert os.path.isdir(message.split("checkpoint saved: ")[1].split(" (continue")[0])
