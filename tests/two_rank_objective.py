"""Worker for tests that need one or two ranks of a real DeepSpeed ZeRO-3 engine on gloo (run under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/two_rank_objective.py \
        --student DIR --case NAME --out FILE.json

Every rank builds the same seeded batch, takes its own sequences (rank r: sequence r) and runs
`objective.stage2_loss` / `stage1_loss` with `engine.backward(loss); engine.step()` for a few steps. Rank 0
writes the losses (and, where asked, the updated weights) to --out. A rank that runs a forward, backward or
collective its peer does not hangs both: the gloo timeout below turns that into an error, and the test's
own timeout into a failure.
"""

import argparse
import datetime
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from topd_ds.rollout.batch import Batch, Windows  # noqa: E402
from topd_ds.config import config_from_dict  # noqa: E402

GLOO_TIMEOUT_S = 40  # a mismatched collective fails after this, instead of waiting forever


def ds_config(world: int) -> dict:
    return {
        "train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        # eps 1: the update is ~ lr * gradient, so equal gradients give equal weights (Adam's g / sqrt(v)
        # would blow float32 rounding of near-zero gradients up to lr-sized differences)
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "eps": 1.0, "torch_adam": True}},
        # persistence 0: every parameter is partitioned and all-gathered per forward, as on a real model
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_prefetch_bucket_size": 0},
        "steps_per_print": 10**9,
    }


def topd_cfg(mode="topd", estimator="full"):
    return config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                             "topd": {"mode": mode}, "opd": {"chunk_size": 3, "estimator": estimator},
                             "rollout": {"n_per_prompt": 2, "prompts_per_step": 1},
                             "train": {"global_batch_size": 2, "micro_batch_size": 1}}, check_paths=False)


def make_batch(vocab: int, teacher_h: int, *, windows_on: tuple, k: int = 4, seed: int = 0) -> Batch:
    """Two sequences; probe windows only on the sequences in `windows_on` (two windows each)."""
    g = torch.Generator().manual_seed(seed)
    seqs, plens = [], []
    for _ in range(2):
        p, r = 4, 7
        seqs.append([1] + torch.randint(4, vocab, (p - 1 + r,), generator=g).tolist())
        plens.append(p)
    hidden = [torch.randn(len(s) - p, teacher_h, generator=g) for s, p in zip(seqs, plens)]
    topk_ids = [torch.stack([torch.randperm(vocab - 4, generator=g)[:5] + 4 for _ in range(len(s) - p)])
                for s, p in zip(seqs, plens)]
    topk_lp = [torch.log_softmax(torch.randn(len(s) - p, 5, generator=g), -1) - 0.5 for s, p in zip(seqs, plens)]
    token_lp = [-torch.rand(len(s) - p, generator=g) for s, p in zip(seqs, plens)]
    batch = Batch(step=0, weight_version=0, sequences=seqs, prompt_lens=plens, teacher_hidden=hidden,
                  teacher_topk_ids=topk_ids, teacher_topk_logprobs=topk_lp, teacher_token_logprobs=token_lp)
    batch.marked = [torch.rand(len(s) - p, generator=g) < 0.3 for s, p in zip(seqs, plens)]
    seq_index = torch.tensor([b for b in windows_on for _ in range(2)], dtype=torch.long)
    m = seq_index.numel()
    position = torch.tensor([plens[int(b)] + 1 + 2 * i for i, b in enumerate(seq_index.tolist())], dtype=torch.long)
    mask = torch.ones(m, k, dtype=torch.bool)
    plan = torch.rand(m, k, k, generator=g)
    batch.windows = Windows(seq_index, position, torch.randint(4, vocab, (m, k), generator=g), mask.clone(),
                            torch.randint(4, vocab, (m, k), generator=g), mask.clone(),
                            plan / plan.sum((1, 2), keepdim=True), torch.rand(m, generator=g))
    return batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", required=True)
    ap.add_argument("--case", required=True, choices=["compare"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()

    import deepspeed

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no 45 s JIT build of the shm op
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    from topd_ds.loss.objective import stage2_loss

    vocab = _vocab(args.student)
    teacher_h = 16
    teacher_head = torch.randn(vocab, teacher_h, generator=torch.Generator().manual_seed(7))
    out = {}
    if args.case == "compare":
        # the production objective (packed windows, hidden states, LossHead) against the direct reference
        # (full logits, one forward per window) on the same ZeRO-3 setup: same losses and updated weights
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import reference_objective as ref
        from topd_ds.loss.objective import stage1_loss

        # windows only on sequence 0: on 2 ranks, rank 1 has no divergent point (it must not skip a forward)
        batch, cfg = make_batch(vocab, teacher_h, windows_on=(0,)), topd_cfg()
        for name, fn in (("new", stage2_loss), ("ref", ref.stage2_loss)):
            out[f"stage2_{name}"] = train(args.student, world, fn, batch, cfg, teacher_head, args.steps)

        def stage1(fn):
            def loss(model, batch, idx, **kw):
                return fn(model, [batch.sequences[i] for i in idx], [batch.prompt_lens[i] for i in idx],
                          [batch.teacher_hidden[i] for i in idx], **kw)
            return loss
        for name, fn in (("new", stage1_loss), ("ref", ref.stage1_loss)):
            out[f"stage1_{name}"] = train(args.student, world, stage1(fn), batch, cfg, teacher_head, args.steps)
    else:
        raise SystemExit(f"--case: unknown {args.case!r}")
    if rank == 0:
        torch.save(out, args.out)


def _start_weights(model_dir):
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}


def _vocab(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).vocab_size


def train(student_dir, world, loss_fn, batch, cfg, teacher_head, steps):
    """A fresh ZeRO-3 engine, `steps` optimizer steps on this rank's sequence; (losses of every rank, the
    gathered weights after the last step on rank 0)."""
    from topd_ds.comm import distributed as ds

    rank = torch.distributed.get_rank()
    engine = ds.build_engine(student_dir, ds_config(world))
    engine.train()
    losses = []
    for _ in range(steps):
        loss, _ = loss_fn(engine, batch, [rank], cfg=cfg, teacher_head=teacher_head, pad_id=0,
                          device=torch.device("cpu"))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, losses)
    weights = ds.gathered_state_dict(engine.module)
    if rank == 0:
        start = _start_weights(student_dir)
        assert any(not torch.equal(weights[n], start[n]) for n in weights), "no weight moved"
    engine.destroy()
    return everyone, weights


if __name__ == "__main__":
    main()
    import torchrun  # tests/, the script's own folder
    torchrun.leave()
