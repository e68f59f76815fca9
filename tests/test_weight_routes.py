"""The in-memory weight routes (update_weights_from_distributed over gloo, update_weights_from_tensor) against a
real built-in server process, with SGLang 0.5.23's request bodies: the server then serves logprobs equal to an
HF forward of the sent weights; bad requests get one line naming the field and change nothing."""

import asyncio
import base64
import os
import pickle

import pytest
import torch

from topd_ds.engines.launch import launch_server
from topd_ds.engines.sglang import SGLangClient
from topd_ds.errors import ServerError
from topd_ds.comm.weight_group import destroy_group, free_port, init_group, serialize_named_tensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = [1, 9, 14, 10, 19, 11, 12, 2]


def _new_weights(model_dir, seed, dtype=torch.float32):
    """The student's parameters, perturbed: [(name, tensor)] in `dtype`, and an HF model holding exactly those."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
            p.copy_(p.to(dtype))         # the reference holds what the server can hold: the sent dtype's values
    return [(n, p.detach().to(dtype).clone()) for n, p in model.named_parameters()], model


def _reference(model):
    with torch.no_grad():
        lp = torch.log_softmax(model.double()(torch.tensor([SEQ])).logits[0], -1)
    return [lp[t - 1, SEQ[t]].item() for t in range(1, len(SEQ))]


async def _served(client):
    return await client.weight_version(), (await client.score([SEQ], start=1))[0].token_logprobs


def _distributed(client, named, version, port, state):
    """The trainer's side: join the group (rank 0) while the server joins, then broadcast while announcing."""
    async def run():
        if state.get("pg") is None:
            def join(world):
                state["pg"] = init_group(backend="gloo", master_address="127.0.0.1", master_port=port,
                                         world_size=world, rank=0, timeout_s=60)
            world = await client.init_weights_group(master_address="127.0.0.1", master_port=port, backend="gloo",
                                                    join=join)
            assert world == 2

        def broadcast():
            for _, t in named:
                torch.distributed.broadcast(t, src=0, group=state["pg"])
        await client.update_weights_from_distributed([n for n, _ in named],
                                                     [str(t.dtype).removeprefix("torch.") for _, t in named],
                                                     [list(t.shape) for _, t in named], version, broadcast)
        return await _served(client)
    return run()


def test_distributed_and_tensor_routes_load_weights_the_server_then_serves(tiny_models):
    """Two syncs over gloo (one group, joined once; fp32 then bf16 tensors), then one by shared memory: each time
    the server reports the new version and its logprobs equal an HF forward of exactly the sent weights."""
    student = tiny_models[1]
    with launch_server(student) as server:
        async def main():
            state = {}
            async with SGLangClient([server.url]) as client:
                before = (await _served(client))[1]
                out = []
                named, ref = _new_weights(student, 1)
                port = free_port()
                out.append((await _distributed(client, named, "1", port, state), _reference(ref)))
                named, ref = _new_weights(student, 2, torch.bfloat16)
                out.append((await _distributed(client, named, "2", port, state), _reference(ref)))
                named, ref = _new_weights(student, 3)
                await client.update_weights_from_tensor(serialize_named_tensors(named), "3")
                out.append((await _served(client), _reference(ref)))
                destroy_group(state["pg"])
                return before, out
        before, out = asyncio.run(main())
    for i, ((version, got), want) in enumerate(out):
        assert version == str(i + 1)
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (i, got, want)
        assert max(abs(a - b) for a, b in zip(before, want)) > 1e-2       # the weights did change


def test_bad_weight_route_requests_name_the_field_and_change_nothing(tiny_models):
    student = tiny_models[1]
    with launch_server(student) as server:
        async def main():
            async with SGLangClient([server.url], max_retries=0) as client:
                before = await _served(client)

                async def post(path, body):
                    return await client._request("POST", path, body, url=server.url, accept=(400,), retries=0)
                answers = {
                    "no_session_tensor": await post("/update_weights_from_tensor", {
                        "serialized_named_tensors": [serialize_named_tensors([("x", torch.zeros(1))])]}),
                    "not_base64": await post("/update_weights_from_tensor", {"serialized_named_tensors": ["%%%"]}),
                    "lengths": await post("/update_weights_from_distributed", {
                        "names": ["a", "b"], "dtypes": ["float32"], "shapes": [[1], [1]]}),
                    "dtype": await post("/update_weights_from_distributed", {
                        "names": ["a"], "dtypes": ["float99"], "shapes": [[1]]}),
                    "nccl_on_cpu": await post("/init_weights_update_group", {
                        "master_address": "127.0.0.1", "master_port": 29999, "rank_offset": 1, "world_size": 2,
                        "backend": "nccl"}),
                    "rank": await post("/init_weights_update_group", {
                        "master_address": "127.0.0.1", "master_port": 29999, "rank_offset": 2, "world_size": 2,
                        "backend": "gloo"}),
                }
                # a pickle that would run code: refused by the allow-list unpickler, the server stays up
                evil = base64.b64encode(pickle.dumps([("x", __import__("os").getcwd)])).decode()
                errors = {}
                for name, body in (("evil", [evil]),
                                   ("unknown_name", [serialize_named_tensors([("no.such.weight", torch.zeros(2))])]),
                                   ("shape", [serialize_named_tensors([("model.norm.weight", torch.zeros(7))])])):
                    try:
                        await client.update_weights_from_tensor(body[0], "9")
                    except ServerError as err:
                        errors[name] = str(err)
                # a session a killed trainer left open is closed by the next update, not refused forever
                await post("/begin_weight_update", {})
                named, ref = _new_weights(student, 4)
                await client.update_weights_from_tensor(serialize_named_tensors(named), "5")
                return before, answers, errors, await _served(client), _reference(ref)
        before, answers, errors, after, want = asyncio.run(main())
    assert answers["no_session_tensor"][0] == 400 and "begin_weight_update" in answers["no_session_tensor"][1]["message"]
    assert "serialized_named_tensors[0]: not base64" in answers["not_base64"][1]["error"]["message"]
    assert "lengths differ (2, 1, 2)" in answers["lengths"][1]["error"]["message"]
    assert "dtypes[0]: not a torch dtype name" in answers["dtype"][1]["error"]["message"]
    assert "nccl needs a server on a GPU" in answers["nccl_on_cpu"][1]["error"]["message"]
    assert "rank_offset: 2 outside [1, 1]" in answers["rank"][1]["error"]["message"]
    assert "blocked global" in errors["evil"] and "/update_weights_from_tensor" in errors["evil"]
    assert "'no.such.weight' is not a parameter" in errors["unknown_name"]
    assert "'model.norm.weight' has shape (32,), got (7,)" in errors["shape"]
    assert after[0] == "5" and max(abs(a - b) for a, b in zip(after[1], want)) < 1e-5
    assert before[0] == "default"


@pytest.mark.parametrize("overrides, message", [
    ({"train": {"weight_sync": "tensor"}, "student_server": {"urls": ["http://gpu-node-7:30000"]}},
     "train.weight_sync: tensor hands over a shared-memory handle, so every student server must run on this machine; "
     "http://gpu-node-7:30000 is not local"),
    ({"train": {"weight_sync": "distributed"}, "student_server": {"urls": ["http://gpu-node-7:30000"]}},
     "train.weight_sync_master: set HOST:PORT that http://gpu-node-7:30000 can reach"),
    ({"train": {"weight_sync": "distributed", "weight_sync_master": "10.0.0.1"}},
     "train.weight_sync_master: expected HOST:PORT with a port in 1..65535, got '10.0.0.1'"),
    ({"train": {"weight_sync": "distributed", "weight_sync_master": "192.0.2.1:29500"}},
     "train.weight_sync_master: cannot listen on 192.0.2.1:29500"),
    ({"train": {"weight_sync": "distributed", "weight_sync_backend": "nccl"}},
     "train.weight_sync_backend: nccl needs a GPU on the trainer"),
    ({"train": {"weight_sync": "tensor"}, "student_server": {"urls": ["http://127.0.0.1:1"], "router": True}},
     "train.weight_sync: tensor sends to each server itself; it cannot go through a router"),
    ({"train": {"weight_sync": "nfs"}}, "train.weight_sync: must be one of 'disk', 'tensor', 'distributed'"),
])
def test_weight_sync_config_errors_are_one_line_naming_the_key(tiny_models, tmp_path, overrides, message,
                                                               monkeypatch):
    import yaml

    from topd_ds.config import load_config
    from topd_ds.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU-less trainer, on any machine
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    cfg = {"model": {"teacher": tiny_models[0], "student": tiny_models[1]}, "data": {"prompts": str(tmp_path / "p.jsonl")}}
    cfg["train"] = {"deepspeed_config": os.path.join(REPO, "tests/ds_zero3_partitioned.json")}
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "c.yaml"))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: NCCL and CUDA IPC (scripts/device_check.sh runs it)")
def test_gpu_routes_nccl_and_cuda_ipc(tiny_models):
    """What only a GPU can confirm: the tensor route with CUDA IPC handles (the device uuid in the pickle) and,
    with two GPUs, the distributed route over NCCL (CUDA tensors broadcast from the trainer's GPU to a built-in
    server on the other GPU); the served logprobs equal the HF forward of the sent weights. NCCL refuses two ranks
    of one communicator on the same GPU ("Duplicate GPU detected", NCCL src/init.cc initTransportsRank), so
    with one GPU the NCCL half is not run (a print says so)."""
    student = tiny_models[1]
    two = torch.cuda.device_count() >= 2
    with launch_server(student, device="cuda:1" if two else "cuda:0") as server:
        async def main():
            out, state = [], {}
            async with SGLangClient([server.url]) as client:
                if two:
                    named, ref = _new_weights(student, 5, torch.bfloat16)
                    named = [(n, t.to("cuda:0")) for n, t in named]
                    port = free_port()

                    def join(world):
                        state["pg"] = init_group(backend="nccl", master_address="127.0.0.1", master_port=port,
                                                 world_size=world, rank=0, timeout_s=120)
                    await client.init_weights_group(master_address="127.0.0.1", master_port=port, backend="nccl",
                                                    join=join)

                    def broadcast():
                        for _, t in named:
                            torch.distributed.broadcast(t, src=0, group=state["pg"])
                        torch.cuda.synchronize()
                    await client.update_weights_from_distributed([n for n, _ in named], ["bfloat16"] * len(named),
                                                                 [list(t.shape) for _, t in named], "g1", broadcast)
                    out.append((await _served(client), _reference(ref), "g1"))
                    destroy_group(state["pg"])
                else:
                    print("one GPU: the NCCL half needs a second GPU for the server; CUDA IPC only")
                named, ref = _new_weights(student, 6)
                named = [(n, t.to("cuda:0")) for n, t in named]
                await client.update_weights_from_tensor(serialize_named_tensors(named), "g2")
                out.append((await _served(client), _reference(ref), "g2"))
                return out
        out = asyncio.run(main())
    for (version, got), want, tag in out:
        assert version == tag
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3, (tag, got, want)   # the server computes on the GPU


_SPLIT_PROBE = r"""
import json, sys, torch, torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from topd_ds.comm.weight_group import free_port, init_group, destroy_group

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
default = c10d._get_default_group()
default.bound_device_id = torch.device("cuda", 0)   # what DeepSpeed's device_id=cuda:LOCAL_RANK leaves behind
seen = {"split_source_asked": 0, "bound_at_creation": []}
real_split, real_helper = c10d._get_split_source, c10d._new_process_group_helper

def split_source(pg):
    seen["split_source_asked"] += 1
    return real_split(pg)

def helper(*args, **kwargs):
    seen["bound_at_creation"].append(str(c10d._get_default_group().bound_device_id))
    return real_helper(*args, **kwargs)

c10d._get_split_source, c10d._new_process_group_helper = split_source, helper
pg = init_group(backend="gloo", master_address="127.0.0.1", master_port=free_port(), world_size=1, rank=0,
                timeout_s=30)
t = torch.arange(3.0)
dist.broadcast(t, src=0, group=pg)                  # the group works
seen["bound_after"] = str(default.bound_device_id)
destroy_group(pg)
print(json.dumps(seen))
dist.destroy_process_group()  # a gloo group alive at exit can abort the process (comm/distributed.leave_at_exit)
"""


def test_weight_group_is_not_split_from_a_device_bound_default_group():
    """Issue 24 finding 1: DeepSpeed binds the default group to cuda:LOCAL_RANK, and torch then creates new groups
    by ncclCommSplit of it (a collective of the trainer ranks that the servers never join: a hang). Simulated on
    gloo: a default group with a bound device id; `init_group` must create its group with no bound id in force
    (torch never asks for a split source) and leave the default group's binding as it was."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SPLIT_PROBE], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["bound_at_creation"] == ["None"], seen
    assert seen["split_source_asked"] == 0, seen
    assert seen["bound_after"] == "cuda:0", seen
