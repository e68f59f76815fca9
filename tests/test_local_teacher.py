"""teacher.scoring local (topd_ds/teacher/local.py): the teacher's states computed on the training ranks give the same
losses and gradients as the teacher server's, for stage 1 (padded and packed rows, sequence parallelism), OPD
(full) and TOPD; a Qwen3-MoE teacher on two ZeRO-3 ranks routed to different experts finishes with the
reference's numbers; stage 1 asks no server for states. Reference = what the teacher server computes: one
unbatched forward per sequence of a plain model, rows p-1 .. len-2 of its final hidden states."""

import copy

import pytest
import torch

import torchrun

from topd_ds.loss import objective
from topd_ds.teacher import local as local_teacher
from topd_ds.config import config_from_dict
from topd_ds.errors import ConfigError

TIMEOUT_S = 150  # a clean 2-rank run takes ~25-45 s on 2 shared cores; a hang is cut by the worker's 40 s gloo timeout


def _cfg(stage="opd", **sections):
    base = {"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"}, "opd": {"chunk_size": 3},
            "teacher": {"scoring": "local"}, "rollout": {"n_per_prompt": 1, "prompts_per_step": 3},
            "train": {"stage": stage, "global_batch_size": 3, "micro_batch_size": 3}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return config_from_dict(base, check_paths=False)


def _server_hidden(model, seqs, plens):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0, p - 1:len(s) - 1]
                for s, p in zip(seqs, plens)]


@pytest.fixture(scope="module")
def f64(tiny_models):
    """(teacher with its lm_head, the same teacher as the local engine holds it: per-sample attention, lm_head
    dropped; student; teacher head), float64."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_models[0]).double().eval()
    local = AutoModelForCausalLM.from_pretrained(tiny_models[0], attn_implementation=local_teacher.register_attention())
    local = local_teacher.drop_lm_head(local.double().eval())
    student = AutoModelForCausalLM.from_pretrained(tiny_models[1]).double()
    return teacher, local, student, teacher.get_output_embeddings().weight.detach().clone()


def _batch(seed, vocab):
    import reference_objective  # noqa: F401  (tests/ on the path: the 2-rank worker's batch maker)
    from two_rank_objective import make_batch

    return make_batch(vocab, 1, windows_on=(0, 1), seed=seed)


@pytest.mark.parametrize("mode", ["opd", "topd"])
def test_stage2_local_equals_server_float64(f64, mode):
    """Same loss and student gradients in float64 whether the teacher's states come in the batch (server) or
    from the local teacher's padded forward inside stage2_loss (rows p - 1 .. len - 2 of the padded grid)."""
    teacher, local, student, head = f64
    seed = 1234
    print(f"seed {seed}")
    batch = _batch(seed, student.config.vocab_size)
    server = copy.copy(batch)
    server.teacher_hidden = _server_hidden(teacher, batch.sequences, batch.prompt_lens)
    batch.teacher_hidden = None
    cfg = _cfg(topd={"mode": mode}, rollout={"n_per_prompt": 2, "prompts_per_step": 1},
               train={"global_batch_size": 2, "micro_batch_size": 2})
    got = {}
    for name, b, t in (("server", server, None), ("local", batch, local)):
        student.zero_grad()
        loss, _ = objective.stage2_loss(student, b, [0, 1], cfg=cfg, teacher_head=head, pad_id=0,
                                        device=torch.device("cpu"), teacher=t)
        loss.backward()
        got[name] = (loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()})
    assert got["local"][0].dtype == torch.float64
    torch.testing.assert_close(got["local"][0], got["server"][0], rtol=1e-12, atol=1e-12)
    for n, g in got["server"][1].items():
        torch.testing.assert_close(got["local"][1][n], g, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("pack_to", [0, 64])
def test_stage1_local_equals_server_float64(f64, pack_to):
    """Stage 1, padded rows (pack_to 0) and packed rows with restarting position ids (pack_to 64, several
    samples per row): the local teacher's states on the student's rows give the server's loss and gradients."""
    from topd_ds.rollout.batch import KDBatch
    from topd_ds.stage1.data import stage1_step_loss

    teacher, local, student, head = f64
    g = torch.Generator().manual_seed(5)
    seqs = [[1] + torch.randint(4, student.config.vocab_size, (n,), generator=g).tolist() for n in (9, 13, 6)]
    plens = [3, 5, 2]
    cfg = _cfg("kd", kd={"kd_ratio": 0.5, "pack_to": pack_to})
    got = {}
    for name, hidden, t in (("server", _server_hidden(teacher, seqs, plens), None), ("local", None, local)):
        student.zero_grad()
        batch = KDBatch(step=0, sequences=seqs, prompt_lens=plens, teacher_hidden=hidden)
        loss, _ = stage1_step_loss(student, batch, [0, 1, 2], cfg=cfg, teacher_head=head, pad_id=0,
                                   device=torch.device("cpu"), teacher=t)
        loss.backward()
        got[name] = (loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()})
    torch.testing.assert_close(got["local"][0], got["server"][0], rtol=1e-12, atol=1e-12)
    for n, grad in got["server"][1].items():
        torch.testing.assert_close(got["local"][1][n], grad, rtol=1e-10, atol=1e-12, msg=n)


def _assert_runs_equal(out, keys, *, atol=1e-6):
    for key in keys:
        (loss_s, w_s), (loss_l, w_l) = out[f"{key}_server"], out[f"{key}_local"]
        flat_s, flat_l = sum(loss_s, []), sum(loss_l, [])  # every rank's losses, step by step
        assert flat_l == pytest.approx(flat_s, abs=atol), (key, loss_l, loss_s)
        for name, w in w_s.items():
            assert torch.allclose(w_l[name], w, atol=atol), (key, name, float((w_l[name] - w).abs().max()))


@pytest.mark.parametrize("world", [1, 2])
def test_zero3_local_equals_server(tiny_models, tmp_path, world):
    """Real ZeRO-3 engines (float32, every parameter partitioned): the local teacher engine inside the loss gives
    every rank's losses and the updated student weights of the server route, for OPD (full), TOPD (windows on
    one rank only: the other still runs the teacher) and stage 1 padded and packed, two steps each."""
    out_file = tmp_path / "out.pt"
    torchrun.run_ranks("two_rank_teacher.py", ["--student", tiny_models[1], "--teacher", tiny_models[0], "--case",
                                               "equal", "--out", out_file], world=world, port=29640 + world,
                       timeout_s=TIMEOUT_S, what=f"local teacher on {world} ZeRO-3 rank(s)")
    out = torch.load(out_file)
    _assert_runs_equal(out, ("opd", "topd", "kd0", "kd64"))
    assert all(len(losses) == world for losses, _ in out.values())


def test_moe_teacher_on_two_ranks_routed_differently(tiny_models, char_tokenizer, tmp_path):
    """A tiny Qwen3-MoE teacher (8 fused experts, top 2) local on 2 ZeRO-3 ranks whose tokens route to different
    experts: both finish (a rank gathering other parameters than its peer would hang until the gloo timeout),
    each rank's states equal the plain model's, and the OPD runs equal the server route's."""
    from tiny_moe import build_moe_teacher

    moe = build_moe_teacher(str(tmp_path / "moe"), char_tokenizer)
    out_file = tmp_path / "out.pt"
    torchrun.run_ranks("two_rank_teacher.py", ["--student", tiny_models[1], "--teacher", moe, "--case", "moe",
                                               "--out", out_file], world=2, port=29643, timeout_s=TIMEOUT_S,
                       what="MoE teacher on 2 ZeRO-3 ranks")
    out = torch.load(out_file)
    assert out["routes"][0] != out["routes"][1], out["routes"]  # the test means something only if routes differ
    assert max(out["hidden_err"]) < 1e-5, out["hidden_err"]
    _assert_runs_equal(out, ("opd",))


def test_sequence_parallel_local_equals_server(tiny_models, tmp_path):
    """Stage 1 packed into one row sharded over a 2-rank Ulysses group: the teacher (plain sdpa, built after the
    student's Ulysses set-up) runs the whole row on each rank and each keeps its shard; loss and DeepSpeed's
    reduced gradients equal the server route's."""
    out_file = tmp_path / "out.pt"
    torchrun.run_ranks("two_rank_teacher.py", ["--student", tiny_models[1], "--teacher", tiny_models[0], "--case",
                                               "sp", "--out", out_file], world=2, port=29644, timeout_s=TIMEOUT_S,
                       what="local teacher under sequence parallelism")
    out = torch.load(out_file)
    server, local = out["sp_server"], out["sp_local"]
    assert local["loss"] == pytest.approx(server["loss"], rel=1e-6)
    for name, grad in server["grads"].items():
        assert torch.allclose(local["grads"][name], grad, rtol=1e-5, atol=1e-7), name


def test_stage1_local_batches_ask_no_server():
    """teacher.scoring local: Stage1Data builds batches without touching the pipeline (None here) or any server."""
    from topd_ds.stage1.data import Stage1Data

    cfg = _cfg("kd", kd={"kd_ratio": 0.5, "source": "dataset"}, train={"global_batch_size": 2, "micro_batch_size": 1})
    records = [{"index": i, "prompt_ids": [1, 5, 6], "response_ids": [7, 8, 2]} for i in range(4)]
    batch = Stage1Data(records, None, cfg).batch(0)
    assert batch.teacher_hidden is None and len(batch.sequences) == 2


def test_needs_local_and_bad_combinations():
    assert local_teacher.needs_local(_cfg("opd"))
    assert local_teacher.needs_local(_cfg("kd", kd={"kd_ratio": 0.5}))
    assert not local_teacher.needs_local(_cfg("opd", teacher={"scoring": "server"}))
    with pytest.raises(ConfigError, match=r"^teacher.scoring: local .* \(needs opd.estimator: full\)"):
        _cfg("opd", opd={"estimator": "topk"})
    with pytest.raises(ConfigError, match=r"^teacher.scoring: local .* \(needs kd.kd_ratio > 0\)"):
        _cfg("kd", kd={"kd_ratio": 0.0})


def test_whole_stage1_run_local_equals_server(tiny_models, tmp_path):
    """`topd-ds train` (one process, real ZeRO-3 engines, built-in servers) for 2 stage-1 steps on packed rows:
    teacher.scoring local (the teacher engine built beside the student, run in each micro-batch's loss) logs the
    losses of the same run with scoring server (the teacher server's hidden states over HTTP)."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from topd_ds.tasks.arith import make_splits, write_jsonl

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    train, _ = make_splits(32, 4, seed=5, depth=2)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    losses = {}
    for scoring in ("server", "local"):
        cfg = {"model": {"teacher": tiny_models[0], "student": tiny_models[1]}, "teacher": {"scoring": scoring},
               "data": {"prompts": str(tmp_path / "train.jsonl"), "max_prompt_tokens": 64},
               "kd": {"source": "dataset", "kd_ratio": 0.5, "pack_to": 48}, "opd": {"chunk_size": 7},
               "train": {"stage": "kd", "deepspeed_config": os.path.join(repo, "tests/ds_zero3_partitioned.json"),
                         "steps": 2, "lr": 1e-2, "global_batch_size": 4, "micro_batch_size": 2,
                         "out_dir": str(tmp_path / "runs"), "run_name": scoring}}
        path = tmp_path / f"{scoring}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([sys.executable, "-m", "topd_ds.train", "--config", str(path)], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(tmp_path / "runs" / scoring / "summary.json") as f:
            losses[scoring] = [h["loss/kd"] for h in json.load(f)["history"]]
    assert len(losses["local"]) == 2
    assert losses["local"] == pytest.approx(losses["server"], rel=1e-5), losses
