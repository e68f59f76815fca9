"""Worker of tests/test_sequence_parallel.py: stage 1 on two DeepSpeed ZeRO-3 ranks that form ONE Ulysses group
(train.sequence_parallel_size 2), on gloo.

    python -m torch.distributed.run --nproc_per_node 2 tests/two_rank_sp.py --student DIR --out FILE.pt

Both ranks take the same micro-batch (four samples of different lengths, teacher hidden states); the samples are
packed into one row, each rank runs the student on its half of the tokens (DeepSpeed's UlyssesSPAttentionHF
all-to-alls q/k/v so attention sees the whole row) and the chunked loss on its half. Rank 0 also computes the
plain loss and gradients in-process: the same samples, unpacked, one padded row each, full logits
(tests/reference_objective.py), on a plain transformers model without DeepSpeed. It writes both, with the
gathered full gradients of the engine (deepspeed.utils.safe_get_full_grad, after DeepSpeed's reduction over the
group), to --out.
"""

import argparse
import datetime
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

GLOO_TIMEOUT_S = 40  # a mismatched collective fails after this, instead of waiting forever
TEACHER_H = 12


def ds_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # persistence 0: every parameter partitioned and gathered per forward, as on a real model
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    return {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "sequence_parallel_size": 2,  # two ranks, one data-parallel stream
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "eps": 1.0, "torch_adam": True}},
            "zero_optimization": zero, "steps_per_print": 10**9}


def samples(vocab: int):
    g = torch.Generator().manual_seed(0)
    seqs, plens, hidden = [], [], []
    for p, r in ((3, 6), (2, 9), (4, 4), (2, 7)):  # 9 + 11 + 8 + 9 = 37 tokens -> one row of 38 (even)
        seqs.append([1] + torch.randint(4, vocab, (p - 1 + r,), generator=g).tolist())
        plens.append(p)
        hidden.append(torch.randn(r, TEACHER_H, generator=g))
    return seqs, plens, hidden


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reduction", default="token")
    args = ap.parse_args()

    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoConfig

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no 45 s JIT build of the shm op
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    rank = torch.distributed.get_rank()

    from topd_ds.comm import distributed as ds
    from topd_ds.loss import sequence_parallel
    from topd_ds.config import config_from_dict
    from topd_ds.rollout.batch import KDBatch
    from topd_ds.stage1.data import stage1_step_loss

    cfg = config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                            "train": {"stage": "kd", "sequence_parallel_size": 2, "micro_batch_size": 4,
                                      "global_batch_size": 4},
                            "kd": {"pack_to": 64}, "opd": {"chunk_size": 5, "reduction": args.reduction}},
                           check_paths=False)
    sequence_parallel.check(args.student, 2, torch.distributed.get_world_size())
    vocab = AutoConfig.from_pretrained(args.student).vocab_size
    teacher_head = torch.randn(vocab, TEACHER_H, generator=torch.Generator().manual_seed(7))
    seqs, plens, hidden = samples(vocab)
    batch = KDBatch(step=0, sequences=seqs, prompt_lens=plens, teacher_hidden=hidden)

    out = {}
    for stage in (3, 2):  # ZeRO-3 and ZeRO-2 average the group's gradients differently (loss_scale)
        engine = ds.build_engine(args.student, ds_config(stage), sequence_parallel_size=2)
        engine.train()
        seen = {}

        def note(module, args, kwargs, output):  # the tokens this rank's forward ran on
            seen["ids"] = tuple(kwargs["input_ids"].shape)
        engine.module.register_forward_hook(note, with_kwargs=True)
        loss, terms = stage1_step_loss(engine, batch, [0, 1, 2, 3], cfg=cfg, teacher_head=teacher_head, pad_id=0,
                                       device=torch.device("cpu"))
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}  # collective
        out[f"zero{stage}"] = {"loss": terms["loss/kd"], "grads": grads, "local_ids_shape": seen["ids"]}
        engine.step()
        engine.destroy()
    if rank == 0:
        import reference_objective as ref
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32, attn_implementation="sdpa")
        plain.train()
        ref_loss, _ = ref.stage1_loss(plain, seqs, plens, hidden, cfg=cfg, teacher_head=teacher_head, pad_id=0,
                                      device="cpu")
        ref_loss.backward()
        out.update(ref_loss=float(ref_loss.detach()),
                   ref_grads={n: p.grad.clone() for n, p in plain.named_parameters()})
        torch.save(out, args.out)


if __name__ == "__main__":
    main()
    import torchrun  # tests/, the script's own folder
    torchrun.leave()
