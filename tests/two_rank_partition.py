"""Worker for test_zero_partitioning.py: what each rank holds of the student during ZeRO-3 steps (under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/two_rank_partition.py \
        --student DIR --ds-json A.json [--ds-json B.json ...] --out FILE.pt

For each ZeRO JSON, resolved by the trainer's own `config.resolve_deepspeed_config` and built by
`distributed.build_engine`: two optimizer steps of the production objective (`objective.stage2_loss`, as in
two_rank_objective.py). Forward pre-hooks registered after DeepSpeed's own (so they run after its gather)
record, for every parameter a module uses, the elements it holds inside that module's forward; after each
step (between forwards) every parameter's status, `param.data` size, local shard size and persistence flag
are recorded. The test reads rank 0's and rank 1's records from --out.
"""

import argparse
import datetime
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from two_rank_objective import GLOO_TIMEOUT_S, make_batch, topd_cfg  # noqa: E402


def resolved(ds_json: str, world: int) -> dict:
    """The JSON with its 'auto' keys filled by the trainer's code path (global batch = one sequence a rank)."""
    from topd_ds.config import config_from_dict, resolve_deepspeed_config

    cfg = config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                            "rollout": {"n_per_prompt": world, "prompts_per_step": 1},
                            "train": {"deepspeed_config": ds_json, "global_batch_size": world,
                                      "micro_batch_size": 1, "lr": 1e-2}}, check_paths=False)
    return resolve_deepspeed_config(cfg, world_size=world)


def snapshot(model) -> dict:
    """name -> (status name, param.data elements, local shard elements, full elements, persistent)."""
    return {n: (p.ds_status.name, p.data.numel(), p.ds_tensor.numel(), p.ds_numel, bool(p.ds_persist))
            for n, p in model.named_parameters()}


def run(student_dir, ds_json, world, steps, teacher_head, batch, cfg):
    from topd_ds.comm import distributed as ds
    from topd_ds.loss.objective import stage2_loss

    rank = torch.distributed.get_rank()
    engine = ds.build_engine(student_dir, resolved(ds_json, world))
    engine.train()
    names = {id(p): n for n, p in engine.module.named_parameters()}
    in_forward = {}  # name -> set of element counts seen inside a forward that uses it

    def pre_hook(module, _inputs):
        external = [p for _, p in getattr(module, "ds_external_parameters", lambda: [])()]  # the LossHead's lm_head
        params = list(module.parameters(recurse=False)) + external
        for p in params:
            if id(p) in names:
                in_forward.setdefault(names[id(p)], set()).add(p.data.numel())

    hooks = [m.register_forward_pre_hook(pre_hook) for m in engine.module.modules()]
    between = []
    for _ in range(steps):
        loss, _ = stage2_loss(engine, batch, [rank], cfg=cfg, teacher_head=teacher_head, pad_id=0,
                              device=torch.device("cpu"))
        engine.backward(loss)
        engine.step()
        between.append(snapshot(engine.module))
    for h in hooks:
        h.remove()
    engine.destroy()
    return {"in_forward": {n: sorted(v) for n, v in in_forward.items()}, "between": between}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", required=True)
    ap.add_argument("--ds-json", action="append", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()

    import deepspeed

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no 45 s JIT build of the shm op
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.student).vocab_size
    teacher_head = torch.randn(vocab, 16, generator=torch.Generator().manual_seed(7))
    batch, cfg = make_batch(vocab, 16, windows_on=(0, 1)), topd_cfg()
    mine = {path: run(args.student, path, world, args.steps, teacher_head, batch, cfg) for path in args.ds_json}
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    if rank == 0:
        torch.save(everyone, args.out)


if __name__ == "__main__":
    main()
    import torchrun  # tests/, the script's own folder
    torchrun.leave()
