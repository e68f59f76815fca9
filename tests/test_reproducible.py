"""The same seed gives the same run at the default staleness: fixed lag, per-request batches, run-unique seeds."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from topd_ds.config import config_from_dict
from topd_ds.rollout.pipeline import Pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class _LagPipeline(Pipeline):
    """build() records the version it was given and sleeps a little; no servers."""

    def __init__(self, max_staleness, sync_every=1, start=0):
        class _Client:
            async def close(self):
                pass

        async def clients():
            return _Client(), _Client()

        cfg = config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                                "pipeline": {"max_staleness": max_staleness, "queue_size": 2},
                                "train": {"steps": 12, "sync_every": sync_every}}, check_paths=False)
        super().__init__(prompts=[[1]], make_clients=clients, teacher_head=None, embedding=None, cfg=cfg,
                         start_step=start, eos_id=2, pad_id=0, weight_version=start)

    async def build(self, step, version):
        import asyncio

        from topd_ds.rollout.batch import Batch

        await asyncio.sleep(0.02 if step % 2 else 0.005)
        return Batch(step=step, weight_version=version, sequences=[], prompt_lens=[], stats={})


@pytest.mark.parametrize("max_staleness,sync_every,start", [(0, 1, 0), (1, 1, 0), (2, 1, 0), (1, 3, 0), (1, 1, 5)])
def test_batch_k_is_sampled_by_exactly_the_lagged_version(max_staleness, sync_every, start):
    """A trainer that trains fast (its syncs come as early as they may): batch k is still sampled by the newest
    synced version <= k - max_staleness, never a newer one; a resumed run's first batches use its start version."""
    pipe = _LagPipeline(max_staleness, sync_every, start).start()
    try:
        got = []
        for step in range(start, 12):
            batch = pipe.get(timeout=20)
            got.append((batch.step, batch.weight_version))
            if (step + 1) % sync_every == 0:                  # what WeightSync does for version step + 1
                pipe.call(pipe.wait_built(step + 1), timeout=20)
                pipe.publish_version(step + 1)
    finally:
        pipe.close()
    want = [(k, max(start, (k - max_staleness) // sync_every * sync_every)) for k in range(start, 12)]
    assert got == want


def test_staleness_beyond_the_queue_is_refused():
    from topd_ds.errors import ConfigError

    with pytest.raises(ConfigError, match=r"pipeline.max_staleness: 4 > pipeline.queue_size \+ 1 = 3"):
        config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                          "pipeline": {"max_staleness": 4, "queue_size": 2}}, check_paths=False)


def test_two_runs_at_staleness_one_have_bitwise_equal_losses(tmp_path, tiny_models):
    """A small TOPD run (built-in servers, 4 steps, max_staleness 1) twice with one seed: every logged loss is
    equal bit for bit. Before, step 1 differed in the 7th digit (requests of two batches merged into one padded
    server batch) and later steps by 5-10% (which version sampled a batch depended on timing)."""
    from topd_ds.tasks.arith import make_splits, write_jsonl

    train, _ = make_splits(64, 4, seed=5, depth=2)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}

    def run(name):
        cfg = {"model": {"teacher": tiny_models[0], "student": tiny_models[1]},
               "data": {"prompts": str(tmp_path / "train.jsonl"), "max_prompt_tokens": 64},
               "rollout": {"n_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 12},
               "topd": {"mode": "topd", "window": 6, "candidate_fraction": 0.25}, "ot": {"solver": "exact"},
               "pipeline": {"max_staleness": 1},
               "train": {"deepspeed_config": os.path.join(REPO, "tests/ds_zero3_partitioned.json"),
                         "steps": 4, "lr": 1e-2,
                         "global_batch_size": 4, "micro_batch_size": 2, "seed": 7,
                         "out_dir": str(tmp_path / "runs"), "run_name": name}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        out = subprocess.run([sys.executable, "-m", "topd_ds.cli", "train", "--config", str(tmp_path / f"{name}.yaml")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        history = json.loads((tmp_path / "runs" / name / "summary.json").read_text())["history"]
        return [{k: v for k, v in h.items() if k.startswith("loss/") or k == "pipeline/staleness"} for h in history]

    a, b = run("a"), run("b")
    assert [h["pipeline/staleness"] for h in a] == [0, 1, 1, 1]
    assert a == b
