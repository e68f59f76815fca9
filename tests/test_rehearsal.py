"""The production topology, rehearsed on the CPU (issue 24; docs/ENGINES.md "The production topology, rehearsed").

`make test-sglang` (scripts/sglang_cpu.sh test) starts two real SGLang 0.5.23 servers from .venv-sglang on the
committed deque models (models/deque: a Llama teacher and a weak student sharing one tokenizer) and runs this
file with .venv's python (the trainer needs DeepSpeed):

    student  SGLang, default flags: rollouts, probes, eval, weight updates
    teacher  SGLang with --chunked-prefill-size 16: scoring (every sequence is prefilled in 16-token pieces), probes
    trainer  scripts/train_single_node.sh with TRAIN_GPUS=0,1: the real `deepspeed` launcher, 2 ranks on gloo,
             ZeRO-3; configs/qwen3_30b_a3b_to_4b/topd.yaml (TOPD, pipeline.max_staleness 1, its weight route,
             its teacher.scoring, global batch 4 = 1 prompt x 4 rollouts, micro-batch 1) scaled down to the tiny
             models, 4 steps and an eval of 4 problems

What the rehearsal does: the job runs in its own process group; once a complete checkpoint of step 2 exists the
whole group gets SIGKILL (launcher and both ranks, no cleanup); the servers stay up, as on a node; the same
command with `--resume auto` finishes the run with a final eval. It fails on
    a broken weight route   the student server must hold weight_version N after the run and answer the logprobs
                            of the exported final weights (checked against transformers' float32 forward)
    a hung server           every run is bounded by a timeout; past it the job's group is killed and the test fails
                            with the log's tail (and test_hung_teacher_stops_with_a_line: a SIGSTOPped teacher
                            must stop the run with one line naming it, within a bound)
    a lost batch            every step 1..N is in the history exactly once, in order, and each batch was sampled
                            by exactly the weight version max_staleness 1 prescribes (0 lag at a (re)start)
Skipped unless TOPD_REHEARSAL_STUDENT_URL and TOPD_REHEARSAL_TEACHER_URL are set (scripts/sglang_cpu.sh sets them).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "configs", "qwen3_30b_a3b_to_4b", "topd.yaml")
STUDENT_URL = os.environ.get("TOPD_REHEARSAL_STUDENT_URL")
TEACHER_URL = os.environ.get("TOPD_REHEARSAL_TEACHER_URL")
TEACHER_PGID = os.environ.get("TOPD_REHEARSAL_TEACHER_PGID")  # the teacher server's process group (setsid)
SCORING = os.environ.get("TOPD_REHEARSAL_SCORING")  # teacher.scoring instead of the paper config's (unset: the paper's)
STEPS = 4
KILL_AFTER = 2          # SIGKILL once the checkpoint of this step is complete
# one segment of the job; past it the job counts as hung (a loaded machine may need more: the variable)
RUN_TIMEOUT_S = float(os.environ.get("TOPD_REHEARSAL_TIMEOUT_S", 300))
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")

pytestmark = pytest.mark.skipif(not (STUDENT_URL and TEACHER_URL),
                                reason="needs real SGLang servers: run `make test-sglang`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout_s: float = 30.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict, timeout_s: float = 60.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def served_version(url: str) -> str:
    """The weight_version a server holds, from SGLang's own endpoints (0.5.23: /model_info, /get_model_info)."""
    for path in ("/get_weight_version", "/model_info", "/get_model_info"):
        try:
            info = get_json(url + path)
        except OSError:
            continue
        if isinstance(info, dict) and isinstance(info.get("weight_version"), str):
            return info["weight_version"]
    raise AssertionError(f"{url}: no weight_version on /get_weight_version, /model_info or /get_model_info")


def paper_config(root, name: str, **over) -> str:
    """The paper's TOPD config with only what the tiny models and the CPU need replaced; everything else (weight
    route, teacher.scoring, pipeline, estimator, OT solver, false-alarm rule, lambda, batch shape) is the paper's."""
    with open(PAPER) as f:
        cfg = yaml.safe_load(f)
    deque = os.path.join(REPO, "models", "deque")
    cfg["model"].update(student=os.path.join(deque, "student"), teacher=os.path.join(deque, "teacher"))
    cfg["data"].update(prompts=os.path.join(deque, "data", "train.jsonl"), eval=os.path.join(deque, "data", "eval.jsonl"),
                       rows="", max_prompt_tokens=40, check_rows=64)   # deque prompts are <= 24 tokens
    cfg["student_server"] = {**cfg.get("student_server", {}), "urls": [STUDENT_URL]}
    cfg["teacher_server"] = {**cfg.get("teacher_server", {}), "urls": [TEACHER_URL]}
    if SCORING:
        cfg["teacher"] = {**cfg.get("teacher", {}), "scoring": SCORING}
    cfg["rollout"]["max_new_tokens"] = 112                    # deque traces are 63-94 characters + <eos>
    cfg["topd"].update(window=16, candidate_fraction=0.05)    # as configs/deque/topd.yaml (~100-token rollouts)
    cfg["train"].update(deepspeed_config=os.path.join(REPO, "ds_configs", "zero3.json"), steps=STEPS, lr=1e-4,
                        save_every=1, eval_samples=4, out_dir=str(root / "runs"), run_name=name)
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def start_job(config: str, root, tag: str, *args) -> subprocess.Popen:
    """scripts/train_single_node.sh as a user runs it, 2 CPU ranks, in a new process group (a job of its own)."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TRAIN_GPUS="0,1", MASTER_PORT=str(free_port()),
               DEEPSPEED=os.path.join(os.path.dirname(sys.executable), "deepspeed"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    log = open(root / f"{tag}.log", "w")
    print(f"rehearsal: {config} {' '.join(args)} (log {log.name})", flush=True)
    proc = subprocess.Popen(["bash", os.path.join(REPO, "scripts", "train_single_node.sh"), config, *args],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log.name
    log.close()
    return proc


def group_members(pgid: int) -> list:
    """Pids of live (not zombie) processes in process group `pgid`."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(pid))
    return out


def kill_group(proc: subprocess.Popen) -> list:
    """SIGKILL the job's whole process group; the pids still alive 15 s later."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 15
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return group_members(proc.pid)


def tail(proc, n: int = 4000) -> str:
    with open(proc.log_path) as f:
        return f.read()[-n:]


def finish(proc, timeout_s: float = RUN_TIMEOUT_S) -> str:
    """Wait for the job; a job still running after timeout_s is killed (whole group) and fails the test."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"the job did not finish in {timeout_s:.0f} s (hung server or route?); log tail:\n{tail(proc)}")
    return tail(proc, 200_000)


def complete_step(run_dir: str) -> int:
    """The newest complete checkpoint's step (0: none): a manifest that verifies, as --resume auto needs."""
    from topd_ds import checkpoint

    for path in reversed(checkpoint.list_checkpoints(run_dir)):
        if checkpoint.verify(path) is None:
            return int(path.rpartition("step-")[2])
    return 0


def export_logprobs(model_dir: str, ids: list) -> list:
    """float32 transformers log p(ids[t] | ids[:t]) for t >= 1: the reference the served weights must match."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def served_logprobs(url: str, ids: list) -> list:
    out = post_json(url + "/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                                        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}})
    return [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]


def test_kill_resume_finish_on_real_servers(tmp_path):
    """Kill the whole 2-rank job mid-run, resume it, finish it; the steps, the eval and the student's weights."""
    t0 = time.monotonic()
    with open(PAPER) as f:
        paper = yaml.safe_load(f)
    route = paper["train"].get("weight_sync", "disk")
    print(f"rehearsal: paper config's route train.weight_sync={route} sync_dir={paper['train'].get('sync_dir', 'auto')}"
          f" teacher.scoring={SCORING or paper.get('teacher', {}).get('scoring', 'server')} "
          f"max_staleness={paper['pipeline']['max_staleness']}", flush=True)
    assert paper["pipeline"]["max_staleness"] == 1, "the rehearsal is of max_staleness 1, the paper config's"
    config = paper_config(tmp_path, "rehearsal")
    run_dir = str(tmp_path / "runs" / "rehearsal")

    # segment A: fresh, SIGKILLed (the whole process group) once step KILL_AFTER's checkpoint is complete
    job = start_job(config, tmp_path, "segment-a")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while complete_step(run_dir) < KILL_AFTER:
        if job.poll() is not None:
            pytest.fail(f"the job exited ({job.returncode}) before step {KILL_AFTER}'s checkpoint:\n{tail(job)}")
        if time.monotonic() > deadline:
            kill_group(job)
            pytest.fail(f"no checkpoint of step {KILL_AFTER} in {RUN_TIMEOUT_S} s (hung?):\n{tail(job)}")
        time.sleep(0.2)
    killed_at = complete_step(run_dir)
    left = kill_group(job)
    t_kill = time.monotonic() - t0
    print(f"rehearsal: SIGKILL of the job's group after step {killed_at}'s checkpoint, {t_kill:.0f} s in", flush=True)
    assert left == [], f"processes of the killed job still alive: {left}"
    assert not os.path.exists(os.path.join(run_dir, "summary.json")), "the killed run must not have finished"
    assert "world=2" in tail(job, 200_000)

    # segment B: the same command with --resume auto, bounded; the servers are the same (never restarted)
    job = start_job(config, tmp_path, "segment-b", "--resume", "auto")
    log = finish(job)
    assert job.returncode == 0, f"the resumed job failed ({job.returncode}):\n{log[-4000:]}"
    print(f"rehearsal: resumed and finished, {time.monotonic() - t0:.0f} s in all", flush=True)
    problems = rehearsal_problems(run_dir, log, killed_at, paper)
    assert not problems, "the rehearsal found:\n  " + "\n  ".join(problems)
    print(f"rehearsal: checks passed, {time.monotonic() - t0:.0f} s in all (kill at {t_kill:.0f} s)", flush=True)


def rehearsal_problems(run_dir: str, log: str, killed_at: int, paper: dict) -> list:
    """Every check of the finished run, one line per failure (all run: one run of minutes shows all that is
    broken). `log`: the resumed segment's output; `killed_at`: the step of the checkpoint it resumed from."""
    from topd_ds.comm.weight_sync import sync_root

    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    problems = []

    def check(ok, what):
        if not ok:
            problems.append(what)

    history = summary["history"]
    steps = [h["step"] for h in history]
    # a lost or repeated batch: every step once, in order, across the kill
    check(summary["steps"] == STEPS and steps == list(range(1, STEPS + 1)),
          f"lost or repeated steps: history has {steps}, summary steps {summary['steps']}, want 1..{STEPS}")
    # each batch sampled by exactly the version max_staleness 1 prescribes: the step before, except the first
    # step of each segment (the run starts or resumes from the weights it trains: lag 0)
    lag = [int(h.get("pipeline/staleness", -1)) for h in history]
    want_lag = [0 if s - 1 in (0, killed_at) else 1 for s in steps]
    check(lag == want_lag, f"staleness per step {lag}, want {want_lag} (max_staleness 1, resumed at {killed_at})")
    check(all(h["loss/total"] == h["loss/total"] and h.get("loss/traj", -1) >= 0 for h in history),
          "a non-finite total loss or a step without the trajectory term")
    # the final eval of the finished run (and the start's, carried through the checkpoint)
    check(set(summary["eval"]) == {"0", str(STEPS)} and 0.0 <= summary["eval"].get(str(STEPS), -1) <= 1.0,
          f"evals {summary['eval']}, want steps 0 and {STEPS}")
    check(f"at step {killed_at}\n" in log and "world=2" in log,
          f"the resumed job did not say 'resumed from ... at step {killed_at}' with world=2")
    check(complete_step(run_dir) == STEPS, f"newest complete checkpoint is step {complete_step(run_dir)}, want {STEPS}")

    # the weight route: the student server holds version N and the exported final weights, the teacher untouched
    version = served_version(STUDENT_URL)
    check(version == str(STEPS), f"weight route: the student server holds weight_version {version!r}, want '{STEPS}'")
    check(served_version(TEACHER_URL) == "default", "the teacher server's weights changed")
    ids = [1] + [5 + (7 * i) % 20 for i in range(40)]
    want = export_logprobs(os.path.join(run_dir, "final"), ids)
    got = served_logprobs(STUDENT_URL, ids)
    err = max(abs(a - b) for a, b in zip(got, want))
    check(len(got) == len(want) and err < 1e-4,  # seen: 9.6e-7 (float32 both sides); initial vs final: 1.25
          f"weight route: the student server's logprobs differ from the final export's by {err:.2e} (max)")
    initial = export_logprobs(os.path.join(REPO, "models", "deque", "student"), ids)
    check(max(abs(a - b) for a, b in zip(initial, want)) > 1e-2, "training did not change the student")
    # nothing of either segment's syncs left in /dev/shm (the killed one's included)
    shm = sync_root(paper["train"].get("sync_dir", "auto"), run_dir, [STUDENT_URL], model_bytes=0)
    if shm.startswith("/dev/shm"):
        left = os.listdir(shm) if os.path.isdir(shm) else []
        check(left == [], f"syncs left in {shm}: {left}")
    return problems


@pytest.mark.skipif(not TEACHER_PGID, reason="needs the teacher server's process group (TOPD_REHEARSAL_TEACHER_PGID)")
def test_hung_teacher_stops_with_a_line(tmp_path):
    """The teacher server SIGSTOPped once the job is up, before its first batch (a hung server: connections
    accepted, nothing answered): the 2-rank job stops by itself with one line naming the teacher, the step and
    `--resume auto`, and a checkpoint, within a bound set by teacher_server.timeout_s, instead of waiting forever.
    Stopped before any batch request, so no unstopped request has to beat the short timeout on a loaded machine
    (stopped after step 1 instead, a 30 s timeout failed unstopped teacher requests on this 2-core machine).
    The teacher is continued afterwards."""
    from topd_ds import checkpoint

    timeout_s = 10.0
    config = paper_config(tmp_path, "hung", teacher_server={"timeout_s": timeout_s, "max_retries": 0, "max_restarts": 0},
                          train={"steps": 3, "eval_every": 0})
    with open(config) as f:
        cfg = yaml.safe_load(f)
    del cfg["data"]["eval"]  # no eval: the hang is what is rehearsed here
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    run_dir = str(tmp_path / "runs" / "hung")
    job = start_job(config, tmp_path, "hung")
    pgid = int(TEACHER_PGID)
    try:
        # "loading ... into the student server(s)": start-up checks done, the pipeline's first batch comes next
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while "into the student server(s)" not in tail(job, 200_000):
            if job.poll() is not None:
                pytest.fail(f"the job exited ({job.returncode}) before it was up:\n{tail(job)}")
            if time.monotonic() > deadline:
                kill_group(job)
                pytest.fail(f"the job was not up in {RUN_TIMEOUT_S} s:\n{tail(job)}")
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGSTOP)
        t_stop = time.monotonic()
        # a request times out (timeout_s), the wait for /health gives up (timeout_s), every rank saves and stops;
        # 90 s more for a loaded machine's rollouts, checkpoint and exit
        log = finish(job, timeout_s=4 * timeout_s + 90)
        took = time.monotonic() - t_stop
    finally:
        os.killpg(pgid, signal.SIGCONT)
    print(f"rehearsal: teacher SIGSTOPped; the job stopped {took:.0f} s later (rc {job.returncode})", flush=True)
    assert job.returncode != 0, log[-3000:]
    lines = [ln for ln in log.splitlines() if "stopped at step" in ln and "teacher" in ln]
    assert lines, f"no line naming the teacher and the step:\n{log[-3000:]}"
    assert "--resume auto" in lines[-1], lines[-1]
    saved = checkpoint.list_checkpoints(run_dir)
    assert saved and checkpoint.verify(saved[-1]) is None, f"no complete checkpoint in {run_dir}"
