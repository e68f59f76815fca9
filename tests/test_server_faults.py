"""Server faults (issue 8, promise 2): restart, reload with the current weights, rebuild, stop after N failures.

Unit tests drive the pipeline's rebuild loop and the supervisor with fake clients and fake server processes;
end-to-end tests run `topd-ds train` as a child process on the tiny models with built-in servers and kill
(SIGKILL) or hang (SIGSTOP) one of them mid-run, or make it impossible to bring back.
"""

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
import yaml

from topd_ds.config import config_from_dict
from topd_ds.engines.protocol import Completion, Scores
from topd_ds.engines.supervisor import ServerFailure, Supervisor
from topd_ds.errors import ProtocolError, ServerError
from topd_ds.rollout.pipeline import Pipeline

V, TOP_K = 7, 3


# ---- fakes ----------------------------------------------------------------------------------------
class FakeClient:
    """Answers that depend only on the request (seed, sequence), like a deterministic server; `fail` is a list
    of method names: each call to the first listed method pops it and raises instead."""

    def __init__(self, fail=()):
        self.fail, self.calls = list(fail), []

    def _maybe_fail(self, name):
        self.calls.append(name)
        if self.fail and self.fail[0] == name:
            self.fail.pop(0)
            raise (ProtocolError if name == "score" else ServerError)(f"fake {name} failed")

    async def generate(self, prompts, params, *, n=1, seeds=None):
        self._maybe_fail("generate")
        out = []
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(seeds[i][0] if seeds else int(params.seed or 0) + i * n)
            out.append([Completion(output_ids=torch.randint(4, V, (3 + j,), generator=g).tolist() + [2],
                                   logprobs=[-1.0] * (4 + j), finish_reason="stop") for j in range(n)])
        return out

    async def score(self, sequences, *, start, top_k=0, return_hidden=False):
        self._maybe_fail("score")
        out = []
        for seq, s in zip(sequences, start):
            g = torch.Generator().manual_seed(sum((i + 1) * t for i, t in enumerate(seq)))
            n = len(seq) - s
            lp = torch.log_softmax(torch.randn(n, V, generator=g), -1)
            top = lp.topk(top_k, -1)
            out.append(Scores(token_logprobs=lp[torch.arange(n), torch.tensor(seq[s:])].tolist(),
                              topk_ids=top.indices.tolist(), topk_logprobs=top.values.tolist()))
        return out

    async def close(self):
        pass


class FakeProc:
    """Stands in for a launched ServerProcess."""
    pids = iter(range(1000, 2000))

    def __init__(self, url, weights):
        self.url, self.weights, self.log_path, self.stopped = url, weights, "/dev/null", False
        self.proc = types.SimpleNamespace(pid=next(self.pids))

    def stop(self, grace_s=None):
        self.stopped = True


def fake_supervisor(*, max_restarts, launch_fails=0):
    sup, launches = Supervisor(None, log=lambda msg: None), []

    def launch(weights, port, version):
        launches.append((weights, port, version))
        if len(launches) <= launch_fails:
            raise ServerError(f"server at http://127.0.0.1:{port} exited with code 1 before it was healthy")
        return FakeProc(f"http://127.0.0.1:{port}", weights)
    for role in ("student", "teacher"):
        sup.launched(role, FakeProc("http://127.0.0.1:4000" if role == "student" else "http://127.0.0.1:4001",
                                    f"/models/{role}"), launch=launch, weights=f"/models/{role}",
                     max_restarts=max_restarts)
    return sup, launches


def make_pipeline(student, teacher, supervisor):
    cfg = config_from_dict({
        "model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
        "rollout": {"n_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 6},
        "topd": {"mode": "opd"}, "opd": {"estimator": "topk", "top_k": TOP_K}, "pipeline": {"max_staleness": 0},
        "train": {"global_batch_size": 4, "micro_batch_size": 4, "seed": 11}}, check_paths=False)

    async def clients():
        if supervisor is None:
            return student, teacher
        return supervisor.guard(student, "student"), supervisor.guard(teacher, "teacher")
    g = torch.Generator().manual_seed(0)
    return Pipeline(prompts=[[1, 5, 6], [1, 4], [1, 6, 6, 5]], make_clients=clients,
                    teacher_head=torch.randn(V, 4, generator=g), embedding=torch.randn(V, 4, generator=g), cfg=cfg,
                    start_step=0, eos_id=2, pad_id=0, weight_version=0, produce=False, supervisor=supervisor)


def assert_same_batch(a, b):
    assert a.step == b.step and a.sequences == b.sequences and a.prompt_lens == b.prompt_lens
    for name in ("teacher_token_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "selection_score"):
        x, y = getattr(a, name), getattr(b, name)
        assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)), name


# ---- unit: the rebuild loop and the supervisor ---------------------------------------------------------
def test_a_step_is_rebuilt_whole_after_server_errors():
    """A dead student at rollout, then a garbage teacher answer at scoring: each restarts that server and the
    same step is rebuilt from scratch; the batch equals one built without faults."""
    clean = make_pipeline(FakeClient(), FakeClient(), None)
    try:
        reference = clean.call(clean.build(3, 0))
    finally:
        clean.close()
    student, teacher = FakeClient(fail=["generate"]), FakeClient(fail=["score"])
    sup, launches = fake_supervisor(max_restarts=3)
    pipe = make_pipeline(student, teacher, sup)
    try:
        batch = pipe.call(pipe.build_retrying(3))
    finally:
        pipe.close()
    assert_same_batch(batch, reference)
    assert batch.stats["rebuilds"] == 2
    assert [w for w, _, _ in launches] == ["/models/student", "/models/teacher"]
    assert [port for _, port, _ in launches] == [4000, 4001]          # same port: clients keep their urls
    assert sup.servers["student"].generation == 1 and sup.servers["teacher"].generation == 1
    assert all(s.failures == 0 for s in sup.servers.values())        # a batch was built: counts reset
    assert student.calls == ["generate", "generate", "score", "generate", "score"]  # each try starts over


def test_trainer_calls_are_redone_after_a_restart():
    """train.call_recovering (the trainer's evals) redoes the whole call after each recovered fault and gives
    up with ServerFailure past the limit."""
    from topd_ds.engines.protocol import SamplingParams
    from topd_ds.evaluate import pass_at_1
    from topd_ds.train import call_recovering

    student = FakeClient(fail=["generate"])
    sup, launches = fake_supervisor(max_restarts=1)
    pipe = make_pipeline(student, FakeClient(), sup)
    try:
        got = call_recovering(pipe, sup, lambda: pipe.student.generate([[1, 5]], SamplingParams(max_new_tokens=4, seed=4), n=2))
        assert student.calls == ["generate", "generate"] and len(launches) == 1
        assert got == pipe.call(FakeClient().generate([[1, 5]], SamplingParams(max_new_tokens=4, seed=4), n=2))
        student.fail = ["generate"] * 3
        with pytest.raises(ServerFailure, match="student_server.max_restarts=1"):
            call_recovering(pipe, sup, lambda: pass_at_1(pipe.student, [[1, 5]], ["3"], str, n=1, temperature=0.0,
                                                         max_new_tokens=4, eos_id=2))
    finally:
        pipe.close()


def test_student_restart_loads_the_newest_synced_weights():
    sup, launches = fake_supervisor(max_restarts=2)
    sup.set_weights("student", "/run/sync/step-00000007", "7")
    err = ServerError("POST http://127.0.0.1:4000/generate: failed after 5 tries")
    err.server_role, err.server_generation = "student", 0
    asyncio.run(sup.recover(err))
    assert launches == [("/run/sync/step-00000007", 4000, "7")]
    assert sup.servers["student"].proc.weights == "/run/sync/step-00000007"


def test_stale_errors_after_a_restart_are_not_counted():
    """Several calls in flight see one death: the first error restarts the server, the others retry."""
    sup, launches = fake_supervisor(max_restarts=1)

    def err():
        e = ServerError("connection refused")
        e.server_role, e.server_generation = "teacher", 0
        return e

    async def both():
        await asyncio.gather(sup.recover(err()), sup.recover(err()), sup.recover(err()))
    asyncio.run(both())
    assert len(launches) == 1 and sup.servers["teacher"].failures == 1


def test_too_many_failures_stop_with_one_line_naming_the_server():
    student = FakeClient(fail=["generate"] * 10)
    sup, launches = fake_supervisor(max_restarts=2)
    pipe = make_pipeline(student, FakeClient(), sup)
    try:
        with pytest.raises(ServerFailure) as info:
            pipe.call(pipe.build_retrying(0))
    finally:
        pipe.close()
    msg = str(info.value)
    assert "\n" not in msg
    assert "built-in student server at http://127.0.0.1:4000" in msg
    assert "failed 3 times in a row (student_server.max_restarts=2)" in msg
    assert "last error: ServerError: fake generate failed" in msg
    assert len(launches) == 2 and student.calls.count("generate") == 3


def test_a_restart_that_fails_counts_as_a_failure():
    sup, launches = fake_supervisor(max_restarts=3, launch_fails=10)
    err = ServerError("gone")
    err.server_role, err.server_generation = "student", 0
    with pytest.raises(ServerFailure, match=r"failed 4 times in a row .* last error: ServerError: server at "
                                            r"http://127.0.0.1:4000 exited with code 1"):
        asyncio.run(sup.recover(err))
    assert len(launches) == 3


def test_user_given_server_is_waited_for_then_given_up_on():
    """urls given in the config: no restart; each failure waits for /health (nothing listens: at most
    health_wait_s), then the limit stops the run."""
    from topd_ds.engines.launch import free_port

    sup = Supervisor(None, log=lambda msg: None)
    url = f"http://127.0.0.1:{free_port()}"
    sup.external("student", [url], max_restarts=1, health_wait_s=0.3)
    err = ServerError(f"POST {url}/generate: failed after 1 tries, last: ClientConnectorError")
    err.server_role, err.server_generation = "student", 0
    t0 = time.perf_counter()
    asyncio.run(sup.recover(err))
    with pytest.raises(ServerFailure, match=r"student server at .* \(given in student_server.urls: not restartable\) "
                                            r"failed 2 times in a row \(student_server.max_restarts=1\)"):
        asyncio.run(sup.recover(err))
    # the lower bound shows the supervisor waited for /health (health_wait_s 0.3, two failures); the upper one only
    # catches an unbounded wait, with room for a loaded machine
    assert 0.25 < time.perf_counter() - t0 < 60


def test_user_given_server_that_comes_back_gets_the_newest_weights(tiny_models, tmp_path):
    """A user-given student server restarted by its operator comes back with its old weights: once healthy it
    is given the newest synced weights at once (before the retry), not at the next sync; then its logprobs are
    those of the synced weights."""
    import shutil

    import transformers

    from topd_ds.engines.launch import launch_server
    from topd_ds.engines.sglang import SGLangClient

    synced = tmp_path / "sync-step-7"
    shutil.copytree(tiny_models[1], synced)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(synced))
    sup = Supervisor(None, log=lambda msg: None)

    async def score(url):
        async with SGLangClient([url]) as client:
            return (await client.score([SEQ], start=2))[0].token_logprobs, await client.weight_version()

    first = launch_server(tiny_models[1])
    port = int(first.url.rsplit(":", 1)[1])
    sup.external("student", [first.url], max_restarts=3, health_wait_s=60)
    sup.set_weights("student", str(synced), "7")
    first.stop()                                                     # the operator restarts it: old weights
    with launch_server(tiny_models[1], port=port) as again:
        err = ServerError(f"POST {again.url}/generate: failed after 1 tries, last: ClientConnectorError")
        err.server_role, err.server_generation = "student", 0
        asyncio.run(sup.recover(err))
        got, version = asyncio.run(score(again.url))
    with torch.no_grad():
        ref = torch.log_softmax(model.double()(torch.tensor([SEQ])).logits[0], -1)
    want = [ref[t - 1, SEQ[t]].item() for t in range(2, len(SEQ))]
    assert version == "7"
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


# ---- end to end: a child `topd-ds train` whose servers are killed, hung, or gone for good ---------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SEQ = [1, 9, 14, 10, 19, 11, 2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models):
    from topd_ds.tasks.arith import make_splits, write_jsonl

    root = tmp_path_factory.mktemp("faults")
    train, _ = make_splits(64, 8, seed=5, depth=2)
    write_jsonl(str(root / "train.jsonl"), train)
    return root


def start_trainer(root, name, tiny_models, *, steps, **servers):
    cfg = {"model": {"teacher": tiny_models[0], "student": tiny_models[1]},
           "data": {"prompts": str(root / "train.jsonl"), "max_prompt_tokens": 64},
           "rollout": {"n_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 10},
           "topd": {"mode": "topd", "window": 5, "candidate_fraction": 0.25}, "ot": {"solver": "exact"},
           "pipeline": {"max_staleness": 0},
           "train": {"stage": "opd", "deepspeed_config": os.path.join(REPO, "tests/ds_zero3_partitioned.json"),
                     "steps": steps,
                     "lr": 1e-2, "global_batch_size": 4, "micro_batch_size": 2, "save_every": 1,
                     "keep_checkpoints": steps + 1, "out_dir": str(root / "runs"), "run_name": name}, **servers}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**{k: v for k, v in os.environ.items() if k not in RANK_VARS}, "PYTHONUNBUFFERED": "1"}
    log = open(root / f"{name}.log", "w+")  # noqa: SIM115 (closed by the test once the trainer is done)
    proc = subprocess.Popen([sys.executable, "-m", "topd_ds.cli", "train", "--config", str(path)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, root / "runs" / name, log


def wait_for(predicate, proc, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"trainer exited ({proc.returncode}) while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def servers_json(run):
    try:
        with open(run / "servers.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def restarted(info, role):
    return info if info and info[role]["restarts"] >= 1 else None


def manifest(run, step):
    return (run / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists()


def forward_logprobs(model_dir, seq):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
    return [float(lp[t - 1, seq[t]]) for t in range(1, len(seq))]


async def score_and_version(url):
    from topd_ds.engines.sglang import SGLangClient

    client = SGLangClient([url], max_retries=0)
    try:
        before = await client.weight_version()
        scores = (await client.score([SEQ], start=1))[0]
        return before, scores.token_logprobs, await client.weight_version()
    finally:
        await client.close()


def test_killed_student_and_hung_teacher_are_restarted_and_the_run_finishes(workdir, tiny_models):
    """After step 1 of 3, kill -9 the student server and SIGSTOP (hang) the teacher server: the next batch
    build fails on each in turn, both are restarted, the batch is rebuilt whole; the restarted student serves
    the newest synced weights (its logprobs equal a forward of the checkpointed export of the version it
    reports, a trained step's); every step trains once and the run ends normally."""
    proc, run, log = start_trainer(workdir, "faults", tiny_models, steps=3,
                                   student_server={"max_retries": 1},
                                   teacher_server={"timeout_s": 6.0, "max_retries": 0})
    first = None
    try:
        wait_for(lambda: manifest(run, 1), proc, "checkpoint 1")
        first = servers_json(run)
        os.kill(first["student"]["pid"], signal.SIGKILL)
        os.kill(first["teacher"]["pid"], signal.SIGSTOP)
        info = wait_for(lambda: restarted(servers_json(run), "student"), proc, "the student restart")
        assert info["student"]["url"] == first["student"]["url"] and info["student"]["pid"] != first["student"]["pid"]
        before, got, after = asyncio.run(score_and_version(info["student"]["url"]))
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if first is not None:
            try:  # a stopped server cannot notice its launcher died: let it go on, then it exits by itself
                os.kill(first["teacher"]["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass
        log.seek(0)
        text = log.read()
        log.close()
    assert proc.returncode == 0, text[-3000:]
    # the restarted student server held the weights of a trained step, not the initial model
    assert before == after and before not in ("default", "0"), (before, after)
    ref = forward_logprobs(run / "checkpoints" / f"step-{int(before):08d}" / "export", SEQ)
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (got, ref)
    assert "restarted built-in student server" in text and "restarted built-in teacher server" in text, text[-3000:]
    final = servers_json(run)
    # (>= : a loaded machine may add a teacher timeout of its own; each is recovered the same way)
    assert final["student"]["restarts"] == 1 and final["teacher"]["restarts"] >= 1
    assert final["student"]["weight_version"] == "3"
    with open(run / "summary.json") as f:
        history = json.load(f)["history"]
    assert [h["step"] for h in history] == [1, 2, 3]                     # no gap, none twice
    # the hung teacher always fails a build, which is redone whole (the dead student fails that build too,
    # or, if it died while loading the step-1 weights, that update, which is sent again)
    assert sum(h["pipeline/rebuilds"] for h in history) >= 1
    assert all(math.isfinite(h["loss/total"]) for h in history), history  # no NaN, no inf


def test_a_server_that_does_not_come_back_stops_the_run_with_a_checkpoint(workdir, tiny_models):
    """A user-given student server goes away after step 1 and stays away: after max_restarts + 1 failures
    the trainer exits 1 with one line naming the server and the last error, and leaves a verified
    checkpoint of the step it stopped at that `--resume auto` picks."""
    from topd_ds import checkpoint
    from topd_ds.engines.launch import launch_server

    with launch_server(tiny_models[1]) as server:
        proc, run, log = start_trainer(workdir, "gone", tiny_models, steps=4, student_server={
            "urls": [server.url], "max_restarts": 1, "max_retries": 0, "timeout_s": 5.0})
        try:
            wait_for(lambda: manifest(run, 1), proc, "checkpoint 1")
            server.stop()
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.seek(0)
            text = log.read()
            log.close()
    assert proc.returncode == 1, text[-3000:]
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"topd-ds train: error: student server at {server.url} (given in "
                                f"student_server.urls: not restartable) failed 2 times in a row "
                                f"(student_server.max_restarts=1); last error: ServerError: "), errors[0]
    stopped = int(errors[0].split("stopped at step ")[1].split(",")[0])
    assert stopped >= 1
    ckpt = str(run / "checkpoints" / f"step-{stopped:08d}")
    assert f"checkpoint saved: {ckpt} (continue with --resume auto)" in errors[0]
    assert checkpoint.verify(ckpt) is None
    assert checkpoint.find_resume(str(run), "auto") == ckpt
    with open(os.path.join(ckpt, "state.json")) as f:
        assert json.load(f)["step"] == stopped
    assert not (run / "summary.json").exists()


def test_in_memory_weight_routes_are_sent_again_after_a_restart():
    """train.weight_sync tensor|distributed: no directory holds the newest weights, so a restarted student server
    (launched from the initial weights) gets them from the trainer's memory through the `reload` hook before the
    caller retries; a reload that fails counts as one more failure."""
    sup, launches = fake_supervisor(max_restarts=2)
    sent = []

    async def reload():
        sent.append(sup.servers["student"].generation)
        if len(sent) == 1:
            raise ServerError("POST http://127.0.0.1:4000/update_weights_from_tensor: failed (HTTP 400)")
    sup.servers["student"].reload = reload
    err = ServerError("POST http://127.0.0.1:4000/generate: failed after 5 tries")
    err.server_role, err.server_generation = "student", 0
    asyncio.run(sup.recover(err))
    assert sent == [1, 2] and len(launches) == 2 and sup.servers["student"].failures == 2
