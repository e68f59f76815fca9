"""`topd-ds sample`: the teacher's stage-1 responses written to JSONL with a real built-in teacher server;
resumes after a torn line and after SIGKILL, with every index exactly once and no torn line left."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from topd_ds.tasks.arith import make_splits, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("sample")
    train, _ = make_splits(40, 1, seed=7, depth=2)
    write_jsonl(str(root / "train.jsonl"), train)
    return root


def config(root, tiny_models, name, n_samples):
    cfg = {"model": {"teacher": tiny_models[0], "student": tiny_models[1]},
           "data": {"prompts": str(root / "train.jsonl"), "max_prompt_tokens": 64,
                    "responses": str(root / f"{name}.jsonl")},
           "kd": {"n_samples": n_samples, "max_new_tokens": 24},
           "teacher_server": {"max_concurrency": 1},  # one request at a time: the kill lands mid-way
           "train": {"stage": "kd", "deepspeed_config": os.path.join(REPO, "tests/ds_zero3_partitioned.json"),
                     "out_dir": str(root / "runs"), "run_name": name}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), root / f"{name}.jsonl"


def lines(path):
    text = path.read_text()
    assert text.endswith("\n"), "torn last line"
    return [json.loads(line) for line in text.splitlines()]


def sample_cmd(path):
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return [sys.executable, "-m", "topd_ds.cli", "sample", "--config", path], env


def test_sample_kill_and_resume(workdir, tiny_models, capsys):
    """An uninterrupted run; then a run SIGKILLed mid-way (its file ended by a torn line by hand, as a kill
    mid-write leaves it) and resumed: each index once, the lines before the kill kept as they were, and
    (per-index seeds) the same responses as the uninterrupted run."""
    from topd_ds.stage1.sample import main

    # one prompt per request (sample.REQUEST_PROMPTS): 8 in flight where no kill must land, 1 in the killed run
    assert main(["--config", config(workdir, tiny_models, "full", 40)[0], "teacher_server.max_concurrency=8"]) == 0
    reference = {r["index"]: r for r in lines(workdir / "full.jsonl")}
    assert sorted(reference) == list(range(40))
    assert "teacher samples" in capsys.readouterr().err  # the progress bar

    path, samples = config(workdir, tiny_models, "killed", 40)
    cmd, env = sample_cmd(path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if samples.exists() and samples.read_text().count("\n") >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = lines(samples)
    assert 8 <= len(before) < 40, len(before)
    with open(samples, "a") as f:
        f.write('{"index": 39, "prompt_ids": [1, 2')  # what a kill mid-write leaves
    assert main(["--config", path, "teacher_server.max_concurrency=8"]) == 0
    assert f"{len(before)} there, {40 - len(before)} to sample" in capsys.readouterr().out
    after = lines(samples)
    assert after[:len(before)] == before
    assert sorted(r["index"] for r in after) == list(range(40))
    assert {r["index"]: r for r in after} == reference
    # a finished file: nothing to do, nothing written
    assert main(["--config", path]) == 0
    assert "40 there, 0 to sample" in capsys.readouterr().out
    assert lines(samples) == after


def test_second_sampler_and_foreign_records_are_refused(workdir, tiny_models, tmp_path):
    """Two samplers on one file would write indices twice: the second is refused. Records sampled from other
    prompts (another data set or template) are not mixed into the file."""
    from topd_ds.errors import DataError, TopdError
    from topd_ds.stage1.sample import ResponsesFile, main

    first = ResponsesFile(str(tmp_path / "r.jsonl"))
    try:
        with pytest.raises(TopdError, match="another `topd-ds sample` is writing it"):
            ResponsesFile(str(tmp_path / "r.jsonl"))
    finally:
        first.close()
    ResponsesFile(str(tmp_path / "r.jsonl")).close()  # free again once the first is closed

    path, samples = config(workdir, tiny_models, "foreign", 4)
    samples.write_text('{"index": 0, "prompt_ids": [1, 9], "response_ids": [14, 2], "finish_reason": "stop"}\n')
    with pytest.raises(DataError, match="record 0 was sampled from another prompt than data.prompts row 0"):
        main(["--config", path])


def test_requests_are_sized_from_the_length_and_the_kv_cache():
    """Finding 4 of issue 24: 8 prompts per request, 64 requests (512 samples) in flight and a 300 s timeout,
    where a tp-2 30B-A3B teacher holds ~40 full-length 16k samples: the queued ones time out. Now: samples in
    flight = what the KV caches hold at full length (capped by max_concurrency), the timeout from the length."""
    from topd_ds.stage1.sample import REQUEST_PROMPTS, plan_requests

    assert REQUEST_PROMPTS == 1
    plan = plan_requests(16384, 800, max_concurrency=64, timeout_s=300.0, kv_tokens=[700_000])
    assert plan.in_flight == 700_000 // (16384 + 800) == 40
    assert plan.timeout_s == pytest.approx(120 + 0.1 * 16384)           # 1758 s, not 300
    two = plan_requests(16384, 800, max_concurrency=64, timeout_s=300.0, kv_tokens=[700_000, 700_000])
    assert two.in_flight == 64 and "max_concurrency 64" in two.why     # 80 fit, the cap wins
    tiny = plan_requests(16384, 800, max_concurrency=64, timeout_s=300.0, kv_tokens=[4096])
    assert tiny.in_flight == 1                                          # never 0
    unknown = plan_requests(24, 64, max_concurrency=8, timeout_s=300.0, kv_tokens=[None])
    assert unknown.in_flight == 8 and unknown.timeout_s == 300.0        # the configured timeout is a floor


def test_progress_counts_samples_one_request_each(tmp_path):
    """Every request carries one prompt, and the bar moves by one per answered sample (a fake teacher that
    answers in reverse order of arrival, so a slow sample holds up no other)."""
    import asyncio

    from topd_ds.engines.protocol import Completion
    from topd_ds.stage1.sample import ResponsesFile, sample_into

    class Teacher:
        def __init__(self):
            self.sizes = []

        async def generate(self, batch, params, n, seeds):
            self.sizes.append(len(batch))
            await asyncio.sleep(0.001 * (20 - len(self.sizes)))
            return [[Completion(output_ids=[7, 8], logprobs=[-0.1, -0.2], finish_reason="stop")] for _ in batch]

    class Bar:
        def __init__(self):
            self.steps = []

        def update(self, k):
            self.steps.append(k)

    out, teacher, bar = ResponsesFile(str(tmp_path / "r.jsonl")), Teacher(), Bar()
    try:
        asyncio.run(sample_into(out, teacher, [[1, 2], [3, 4, 5]], list(range(11)), None, run_seed=0, bar=bar,
                                concurrency=4))
    finally:
        out.close()
    assert teacher.sizes == [1] * 11 and bar.steps == [1] * 11
    assert sorted(out.done) == list(range(11))
