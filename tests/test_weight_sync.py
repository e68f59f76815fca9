"""Weight sync: absolute paths a server in another directory can open, /dev/shm when it fits, the training dtype."""

import asyncio
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from topd_ds.comm.weight_sync import sync_root, training_dtype

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

    from topd_ds.comm import distributed as ds

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
           "train": {"deepspeed_config": os.path.join(REPO, "tests/ds_zero3_partitioned.json"), "steps": 2, "lr": 1e-2,
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
    # the RAM-disk copy is removed at the end: this run's own directory (named by a hash of its run dir, so a
    # concurrent run of the suite cannot make this fail or pass), not any "rel-*" under /dev/shm/topd-ds-sync
    from topd_ds.comm.weight_sync import sync_root

    root = sync_root("auto", str(trainer_dir / "runs" / "rel"), [server.url], model_bytes=0)
    assert not os.path.exists(root), (root, os.listdir(root))


# ---- issue 24: the in-memory routes' requirements, checked at start; the broadcast's fallback to disk ----------

# what SGLang 0.5.23 answers at GET /get_server_info (read from the wheel: entrypoints/http_server.py:854-891 puts
# the resolved launch flags at the top level, then "version"), cut to the fields the checks read
SGLANG_INFO = {"tp_size": 1, "dp_size": 2, "enable_dp_attention": False, "version": "0.5.23",
               "chunked_prefill_size": 8192}


class InfoServer:
    """A real HTTP server answering GET /get_server_info with `info` (a stand-in for a running SGLang)."""

    def __init__(self, info):
        import threading

        from aiohttp import web

        from topd_ds.engines.launch import free_port

        self.info, self.port, self.web = info, free_port(), web
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def handle(self, request):
        return self.web.json_response(self.info)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = self.web.Application()
        app.router.add_get("/get_server_info", self.handle)
        self.runner = self.web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(self.web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _route_config(tmp_path, tiny_models, url, **train):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    cfg = {"model": {"teacher": tiny_models[0], "student": tiny_models[1]},
           "data": {"prompts": str(tmp_path / "p.jsonl"), "max_prompt_tokens": 64},
           "rollout": {"max_new_tokens": 8}, "student_server": {"urls": [url]},
           "train": {"deepspeed_config": os.path.join(REPO, "tests/ds_zero3_partitioned.json"),
                     "out_dir": str(tmp_path),
                     **train}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "c.yaml")


@pytest.mark.parametrize("route", ["tensor", "distributed"])
def test_in_memory_route_with_data_parallel_servers_stops_before_any_model_loads(tiny_models, tmp_path, monkeypatch,
                                                                                 route):
    """Finding 3: SGLang 0.5.23 asserts dp_size == 1 for every in-memory update (HTTP 500 after the join's
    timeout). `topd-ds train` reads dp_size from /get_server_info and stops with one line, before the
    process group, the data or any model: no run_dir is created. The disk route takes the same servers."""
    from topd_ds import train as train_mod
    from topd_ds.errors import ConfigError

    for k in RANK_VARS:
        monkeypatch.delenv(k, raising=False)
    built = []
    monkeypatch.setattr(train_mod.ds, "build_engine", lambda *a, **k: built.append(1))
    monkeypatch.setattr(train_mod.ds, "init_distributed", lambda *a, **k: built.append(0))
    with InfoServer(SGLANG_INFO) as url:
        with pytest.raises(ConfigError) as err:
            train_mod.main(["--config", _route_config(tmp_path, tiny_models, url, weight_sync=route)])
    msg = str(err.value)
    assert f"train.weight_sync: {route} needs student servers with dp_size 1" in msg and "--dp-size 2" in msg, msg
    assert url in msg and "\n" not in msg
    assert built == [] and sorted(os.listdir(tmp_path)) == ["c.yaml", "p.jsonl"]   # no run_dir either


def test_server_checks_read_real_answers_and_pass_the_built_in_server(tiny_models, tmp_path):
    """The same check over HTTP: dp 1 passes; the built-in server (no /get_server_info: this package, dp 1)
    passes; disk never asks."""
    from topd_ds.config import load_config
    from topd_ds.engines.launch import launch_server
    from topd_ds.comm.weight_sync import check_route_servers

    with InfoServer({**SGLANG_INFO, "dp_size": 1}) as url:
        check_route_servers(load_config(_route_config(tmp_path, tiny_models, url, weight_sync="tensor")))
    with launch_server(tiny_models[1]) as server:
        check_route_servers(load_config(_route_config(tmp_path, tiny_models, server.url, weight_sync="distributed")))
    asked = []
    check_route_servers(load_config(_route_config(tmp_path, tiny_models, "http://127.0.0.1:1", weight_sync="disk")),
                        fetch=asked.append)
    assert asked == []


def test_nccl_versions_that_cannot_match_stop_the_distributed_route(tiny_models, tmp_path, monkeypatch):
    """Finding 2: the trainer's torch 2.13.0 ships NCCL 2.29.7, SGLang 0.5.23's torch 2.14.1 ships 2.30.7, and NCCL
    builds no communicator across versions. With a GPU trainer (NCCL faked: this CPU has none) the start stops
    with one line naming both versions; a matching override passes; an unknown SGLang version is refused."""
    from topd_ds.comm import weight_sync
    from topd_ds.config import load_config
    from topd_ds.errors import ConfigError
    from topd_ds.comm.weight_sync import check_route_servers, route_problems

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(weight_sync, "trainer_nccl", lambda: "2.29.7")
    with InfoServer({**SGLANG_INFO, "dp_size": 1}) as url:
        cfg = load_config(_route_config(tmp_path, tiny_models, url, weight_sync="distributed"))
        with pytest.raises(ConfigError) as err:
            check_route_servers(cfg)
        check_route_servers(load_config(_route_config(tmp_path, tiny_models, url, weight_sync="distributed",
                                                      weight_sync_nccl="2.29.7")))
    msg = str(err.value)
    assert "NCCL 2.30.7, this trainer 2.29.7" in msg and "\n" not in msg, msg
    info = {**SGLANG_INFO, "dp_size": 1, "version": "0.9.0"}
    [unknown] = route_problems("distributed", "nccl", {"u": info}, trainer_nccl="2.29.7")
    assert unknown.startswith("train.weight_sync_nccl: cannot tell the NCCL version of u (SGLang 0.9.0")
    assert route_problems("distributed", "gloo", {"u": info}, trainer_nccl=None) == []
    assert route_problems("distributed", "nccl", {"u": None}, trainer_nccl="2.29.7") == []   # built-in server
    assert route_problems("disk", "nccl", {"u": SGLANG_INFO}, trainer_nccl="2.29.7") == []


def test_tensor_route_without_room_on_dev_shm_stops_with_one_line(tmp_path, monkeypatch):
    """Finding 6: the tensor route puts two versions of the student in /dev/shm (CPU tensors: no CUDA IPC). A
    container's default 64 MB /dev/shm and a 40 MB student (fp32, 10M parameters) cannot: one line, before any
    gather. With 1 GB free it starts."""
    import collections
    import types

    from topd_ds.comm import weight_sync
    from topd_ds.errors import ConfigError

    module = torch.nn.Linear(1, 1)
    module.weight = torch.nn.Parameter(torch.empty(10_000_000, device="meta"))   # 40 MB in fp32, no memory
    engine = types.SimpleNamespace(module=module, bfloat16_enabled=lambda: False, fp16_enabled=lambda: False)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(weight_sync.shutil, "disk_usage", lambda p: usage(64 << 20, 0, 64 << 20))
    with pytest.raises(ConfigError) as err:
        weight_sync.WeightSync(engine, None, None, str(tmp_path / "sync"), route="tensor", shm=str(tmp_path))
    msg = str(err.value)
    assert msg.startswith("train.weight_sync: tensor needs room for two versions of the student in") and "\n" not in msg
    assert "(0.07 GiB), 0.06 GiB free" in msg, msg
    monkeypatch.setattr(weight_sync.shutil, "disk_usage", lambda p: usage(1 << 30, 0, 1 << 30))
    weight_sync.WeightSync(engine, None, None, str(tmp_path / "sync"), route="tensor", shm=str(tmp_path))


def test_a_failed_broadcast_sends_that_version_by_disk(tiny_models, tmp_path):
    """Finding 5, the part a CPU can run: a student server that gives up during update_weights_from_distributed
    (after the group was joined and the broadcast ran) makes rank 0 drop the group and send THAT version by
    update_weights_from_disk, written from rank 0's memory: the directory holds exactly the sent tensors, the
    supervisor would restart from it, and the next version joins a new group."""
    import types

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from topd_ds.errors import ServerError
    from topd_ds.comm.weight_group import free_port
    from topd_ds.comm.weight_sync import WeightSync

    calls = []

    class FlakyStudent:
        """Joins (world 1: the trainer alone), lets the broadcast run, then fails once like a dying server."""

        async def init_weights_group(self, *, master_address, master_port, backend, join):
            calls.append("join")
            await asyncio.to_thread(join, 1)
            return 1

        async def update_weights_from_distributed(self, names, dtypes, shapes, version, broadcast, *, abort=None):
            await asyncio.to_thread(broadcast)
            calls.append(f"announce {version}")
            if version == "3":
                abort()
                raise ServerError("http://127.0.0.1:30000/update_weights_from_distributed: failed (HTTP 500)")

        async def update_weights(self, path, version):
            calls.append(f"disk {version} {os.path.basename(path)}")

    module = AutoModelForCausalLM.from_pretrained(tiny_models[1])
    engine = types.SimpleNamespace(module=module, bfloat16_enabled=lambda: False, fp16_enabled=lambda: False)
    g = torch.Generator().manual_seed(24)
    named = [(n, torch.randn(p.shape, generator=g)) for n, p in module.named_parameters()]
    sync = WeightSync(engine, types.SimpleNamespace(student=FlakyStudent()), AutoTokenizer.from_pretrained(tiny_models[1]),
                      str(tmp_path / "sync"), route="distributed", master=("127.0.0.1", free_port()), backend="gloo",
                      group_timeout_s=30)
    asyncio.run(sync._send_memory(3, named))
    assert calls == ["join", "announce 3", "disk 3 step-00000003"] and sync.group is None
    saved = load_file(str(tmp_path / "sync" / "step-00000003" / "model.safetensors"))
    assert set(saved) == {n for n, _ in named} - {"lm_head.weight"} or set(saved) == {n for n, _ in named}
    for n, t in named:
        if n in saved:
            assert torch.equal(saved[n], t), n
    asyncio.run(sync._send_memory(4, named))                       # the next version: a new group, in memory
    assert calls[3:] == ["join", "announce 4"] and sync.group is not None
    sync.close()
    assert not (tmp_path / "sync" / "step-00000003").exists()


@pytest.mark.parametrize("name", ["stage1_kd", "opd", "topd"])
def test_paper_configs_use_the_disk_route(name):
    """Issue 24 defaults: until a GPU run confirms the in-memory routes, the paper configs send weights by disk
    (on /dev/shm when it has room), which works with the README's --dp 2 student and through a router."""
    with open(os.path.join(REPO, "configs", "qwen3_30b_a3b_to_4b", f"{name}.yaml")) as f:
        train = yaml.safe_load(f)["train"]
    assert train["weight_sync"] == "disk" and train["sync_dir"] == "auto"
