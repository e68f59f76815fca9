"""Worker for tests/test_local_teacher.py: teacher.scoring local vs server on 1 or 2 ZeRO-3 gloo ranks (torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/two_rank_teacher.py \
        --student DIR --teacher DIR --case equal|moe --out FILE.pt

equal: the same seeded batch trained two ways on fresh ZeRO-3 student engines, `server` (the teacher's states
in the batch, computed as the teacher server computes them: one unbatched forward per sequence of a plain
model) and `local` (batch.teacher_hidden None, the ZeRO-3 teacher engine run inside the loss), for stage 1
(padded and packed rows), OPD (full) and TOPD; rank 0 writes both runs' losses and updated weights.
moe: the local teacher is a Qwen3-MoE; each rank records which experts its tokens routed to, and its teacher
states are checked against the plain model's. Every stage3 parameter is partitioned (persistence threshold 0).
"""

import argparse
import copy
import datetime
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from two_rank_objective import GLOO_TIMEOUT_S, ds_config, make_batch, topd_cfg, train  # noqa: E402


def server_hidden(teacher_dir, sequences, prompt_lens):
    """The teacher server's states: a plain model, one forward per sequence, rows p-1 .. len-2."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0, p - 1:len(s) - 1]
                for s, p in zip(sequences, prompt_lens)]


def teacher_head_of(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir).get_output_embeddings().weight.detach().float().clone()


def kd_cfg(pack_to: int):
    from topd_ds.config import config_from_dict

    return config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                             "teacher": {"scoring": "local"}, "opd": {"chunk_size": 3},
                             "kd": {"kd_ratio": 0.5, "pack_to": pack_to},
                             "train": {"stage": "kd", "global_batch_size": 2, "micro_batch_size": 1}},
                            check_paths=False)


def with_teacher(loss_fn, teacher):
    return lambda model, batch, idx, **kw: loss_fn(model, batch, idx, teacher=teacher, **kw)


def check_partitioned(teacher, world):
    """Every teacher parameter is a ZeRO-3 partition: 1/world of it here (rounded up), nothing outside forward."""
    for name, p in teacher.module.named_parameters():
        assert hasattr(p, "ds_id") and p.numel() == 0, f"{name}: not partitioned"
        assert p.ds_tensor.numel() == -(-p.ds_numel // world), \
            f"{name}: partition {p.ds_tensor.numel()} of {p.ds_numel}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--case", required=True, choices=["equal", "moe", "sp"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import deepspeed

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no 45 s JIT build of the shm op
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    from topd_ds.comm import distributed as ds
    from topd_ds.loss.objective import stage2_loss
    from topd_ds.rollout.batch import KDBatch
    from topd_ds.stage1.data import stage1_step_loss
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.student).vocab_size
    t_head = teacher_head_of(args.teacher)
    server = make_batch(vocab, t_head.shape[1], windows_on=(0,), seed=11)  # windows on sequence 0 only
    server.teacher_hidden = server_hidden(args.teacher, server.sequences, server.prompt_lens)
    local = copy.copy(server)
    local.teacher_hidden = None  # the contract: teacher.scoring local batches carry no teacher states
    out = {}
    if args.case == "sp":  # both ranks one Ulysses group; the teacher built after the student's SP set-up, as in train
        out.update(sequence_parallel(args, t_head, vocab, world))
        if rank == 0:
            torch.save(out, args.out)
        return
    teacher = ds.build_teacher_engine(args.teacher, ds_config(world))
    check_partitioned(teacher, world)
    if args.case == "moe":
        experts = []  # (layer, expert ids) routed to by this rank's tokens
        def note(n):  # the router returns (logits, scores, expert indices (tokens, top_k))
            return lambda module, args, out: experts.append((n, set(out[2].flatten().tolist())))
        hooks = [layer.mlp.gate.register_forward_hook(note(n)) for n, layer in enumerate(teacher.module.model.layers)]
        from topd_ds.teacher.local import response_hidden

        mine = [rank]  # rank r scores sequence r (the sequences differ, so do the routes)
        got = response_hidden(teacher, [server.sequences[i] for i in mine], [server.prompt_lens[i] for i in mine],
                              pad_id=0, device=torch.device("cpu"))
        for h in hooks:
            h.remove()
        err = max(float((g - server.teacher_hidden[i]).abs().max()) for g, i in zip(got, mine))
        routes = [None] * world
        torch.distributed.all_gather_object(routes, sorted((n, sorted(e)) for n, e in experts))
        out["routes"], out["hidden_err"] = routes, [None] * world
        torch.distributed.all_gather_object(out["hidden_err"], err)
        cfg = topd_cfg(mode="opd")
        for name, batch, fn in (("server", server, stage2_loss), ("local", local, with_teacher(stage2_loss, teacher))):
            out[f"opd_{name}"] = train(args.student, world, fn, batch, cfg, t_head, 2)
    else:
        for mode in ("opd", "topd"):
            cfg = topd_cfg(mode=mode)
            for name, batch, fn in (("server", server, stage2_loss),
                                    ("local", local, with_teacher(stage2_loss, teacher))):
                out[f"{mode}_{name}"] = train(args.student, world, fn, batch, cfg, t_head, 2)
        for pack_to in (0, 64):
            cfg = kd_cfg(pack_to)
            for name, hidden, teach in (("server", server.teacher_hidden, None), ("local", None, teacher)):
                batch = KDBatch(step=0, sequences=server.sequences, prompt_lens=server.prompt_lens,
                                teacher_hidden=hidden)
                fn = stage1_step_loss if teach is None else with_teacher(stage1_step_loss, teach)
                out[f"kd{pack_to}_{name}"] = train(args.student, world, fn, batch, cfg, t_head, 2)
    if rank == 0:
        torch.save(out, args.out)


def sequence_parallel(args, t_head, vocab, world):
    """Stage 1 packed into one row sharded over a 2-rank Ulysses group (tests/two_rank_sp.py's samples): the
    server's states vs the local teacher's, loss and DeepSpeed's reduced full gradients."""
    import two_rank_sp
    from deepspeed.utils import safe_get_full_grad

    from topd_ds.comm import distributed as ds
    from topd_ds.config import config_from_dict
    from topd_ds.rollout.batch import KDBatch
    from topd_ds.stage1.data import stage1_step_loss

    cfg = config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                            "teacher": {"scoring": "local"}, "kd": {"pack_to": 64}, "opd": {"chunk_size": 5},
                            "train": {"stage": "kd", "sequence_parallel_size": 2, "micro_batch_size": 4,
                                      "global_batch_size": 4}}, check_paths=False)
    seqs, plens, _ = two_rank_sp.samples(vocab)
    hidden = server_hidden(args.teacher, seqs, plens)
    out, teacher = {}, None
    for name in ("server", "local"):
        engine = ds.build_engine(args.student, two_rank_sp.ds_config(3), sequence_parallel_size=2)
        engine.train()
        if name == "local":
            teacher = ds.build_teacher_engine(args.teacher, ds_config(world))
            check_partitioned(teacher, world)
        batch = KDBatch(step=0, sequences=seqs, prompt_lens=plens, teacher_hidden=hidden if teacher is None else None)
        loss, terms = stage1_step_loss(engine, batch, [0, 1, 2, 3], cfg=cfg, teacher_head=t_head, pad_id=0,
                                       device=torch.device("cpu"), teacher=teacher)
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}  # collective
        out[f"sp_{name}"] = {"loss": terms["loss/kd"], "grads": grads}
        engine.step()
        engine.destroy()
    return out


if __name__ == "__main__":
    main()
    import torchrun  # tests/, the script's own folder
    torchrun.leave()
