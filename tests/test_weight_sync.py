"""Weight sync: absolute paths a server in another directory can open, /dev/shm when it fits, the training dtype."""

import asyncio
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from topd_ds.weight_sync import sync_root, training_dtype

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_sync_root_is_absolute_and_on_shm_only_when_every_server_is_local_and_it_fits(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.chdir(tmp_path)
    local = sync_root("auto", "runs/a", [], model_bytes=1000, shm=str(shm))
    assert local.startswith(str(shm) + os.sep) and os.path.isabs(local)
    assert sync_root("auto", "runs/a", ["http://127.0.0.1:30000"], model_bytes=1000, shm=str(shm)) == local
    assert sync_root("auto", "runs/b", [], model_bytes=1000, shm=str(shm)) != local      # one dir per run
    remote = sync_root("auto", "runs/a", ["http://gpu-node-7:30000"], model_bytes=1000, shm=str(shm))
    assert remote == str(tmp_path / "runs" / "a" / "sync")
    huge = sync_root("auto", "runs/a", [], model_bytes=1 << 60, shm=str(shm))             # no room on the RAM disk
    assert huge == str(tmp_path / "runs" / "a" / "sync")
    assert sync_root("auto", "runs/a", [], model_bytes=1, shm=str(tmp_path / "none")) == huge
    assert sync_root("weights", "runs/a", [], model_bytes=1, shm=str(shm)) == str(tmp_path / "weights")


def test_synced_weights_are_written_in_the_training_dtype(tiny_models, tmp_path):
    """A bf16 engine writes bf16 safetensors (half the bytes of fp32); an fp32 one writes fp32."""
    import types

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from topd_ds import distributed as ds

    module = AutoModelForCausalLM.from_pretrained(tiny_models[1])
    sizes = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        engine = types.SimpleNamespace(module=module, bfloat16_enabled=lambda bf16=bf16: bf16, fp16_enabled=lambda: False)
        path = ds.save_consolidated(engine, str(tmp_path / name), dtype=training_dtype(engine))
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert dtypes == {torch.bfloat16 if bf16 else torch.float32}, dtypes
        sizes[name] = os.path.getsize(os.path.join(path, "model.safetensors"))
    assert sizes["bf16"] < 0.6 * sizes["fp32"]


@pytest.mark.parametrize("route", ["disk", "tensor", "distributed"])
def test_server_started_elsewhere_loads_the_synced_weights(tiny_models, tmp_path, route):
    """The shipped relative out_dir ('runs') and a user-given student server started in another directory: the
    run used to stop after step 1 ('no such directory runs/.../sync/step-00000001'). Now every sync reaches
    the server, and at the end it serves logprobs equal to the trainer's final weights; the same through each
    route of train.weight_sync (tensor: shared memory; distributed: a gloo group with the server)."""
    from topd_ds.engines.launch import launch_server
    from topd_ds.engines.sglang import SGLangClient
    from topd_ds.tasks.arith import make_splits, write_jsonl

    trainer_dir, server_dir = tmp_path / "trainer", tmp_path / "server"
    trainer_dir.mkdir()
    server_dir.mkdir()
    train, evals = make_splits(32, 4, seed=5, depth=2)
    write_jsonl(str(trainer_dir / "train.jsonl"), train)
    cfg = {"model": {"teacher": tiny_models[0], "student": tiny_models[1]},
           "data": {"prompts": "train.jsonl", "max_prompt_tokens": 64},
           "rollout": {"n_per_prompt": 2, "prompts_per_step": 1, "max_new_tokens": 8},
           "topd": {"mode": "opd"}, "opd": {"estimator": "topk", "top_k": 5}, "pipeline": {"max_staleness": 0},
           "train": {"deepspeed_config": os.path.join(REPO, "ds_configs/zero3.json"), "steps": 2, "lr": 1e-2,
                     "global_batch_size": 2, "micro_batch_size": 2, "out_dir": "runs", "run_name": "rel",
                     "weight_sync": route}}
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    seq = [1, 9, 14, 10, 19, 11, 12, 2]
    with launch_server(tiny_models[1], cwd=str(server_dir)) as server:
        cfg["student_server"] = {"urls": [server.url]}
        (trainer_dir / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        out = subprocess.run([sys.executable, "-m", "topd_ds.cli", "train", "--config", "cfg.yaml"], cwd=trainer_dir,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]

        async def served():
            async with SGLangClient([server.url]) as client:
                return await client.weight_version(), (await client.score([seq], start=1))[0].token_logprobs
        version, got = asyncio.run(served())
    assert version == "2"
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(str(trainer_dir / "runs" / "rel" / "final")).double().eval()
    with torch.no_grad():
        ref = torch.log_softmax(final(torch.tensor([seq])).logits[0], -1)
    want = [ref[t - 1, seq[t]].item() for t in range(1, len(seq))]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5
    history = json.loads((trainer_dir / "runs" / "rel" / "summary.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2] and all(h["sync/bytes"] > 0 for h in history)
    leftovers = [d for d in os.listdir("/dev/shm/topd-ds-sync") if d.startswith("rel-")] \
        if os.path.isdir("/dev/shm/topd-ds-sync") else []
    assert not leftovers, leftovers               # the RAM-disk copy is removed at the end
