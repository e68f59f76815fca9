"""What every study command shares: its config and output folder, the servers, and the pipeline's pieces.

A study reads the same YAML as `topd-ds train` (models, servers, rollout, topd.window, ot) plus
`key.path=value` overrides; it launches built-in servers when the config names no URL and stops them on exit.
Rollouts and teacher scoring go through `Pipeline.build` with probing switched off, probes through the
pipeline's `probe_windows`, and D_OT uses the config's cost and solver as training does, so a study measures
what training would see.
"""

import argparse
import contextlib
import dataclasses
import os

import torch

from topd_ds.config import load_config
from topd_ds.errors import ConfigError


def add_common_args(ap: argparse.ArgumentParser):
    ap.add_argument("--config", required=True, help="the YAML of a stage-2 run (models, servers, topd, ot)")
    ap.add_argument("--out", required=True, help="output folder (JSON, PNG figures, TensorBoard in tb/)")
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. topd.window=20")


def load_study_config(args):
    """The config, checked; the output folder must not be a file."""
    cfg = load_config(args.config, args.overrides)
    if not cfg.data.prompts:
        raise ConfigError("data.prompts: required (the prompts the student rolls out on)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out: {args.out} exists and is not a directory")
    return cfg


def scoring_only(cfg):
    """The config with probing off: Pipeline.build then stops after rollouts and teacher scoring."""
    return dataclasses.replace(cfg, topd=dataclasses.replace(cfg.topd, mode="opd"))


@dataclasses.dataclass
class Session:
    cfg: object
    tokenizer: object
    teacher_head: torch.Tensor   # (V, H)
    embedding: torch.Tensor      # (V, D) OT ground-cost table
    pipeline: object

    def batch(self, step: int):
        """Rollouts for step `step`'s prompts, scored by the teacher (full-vocab hidden states or top-k)."""
        return self.pipeline.call(self.pipeline.build(step, 0))

    def probe(self, batch, selected):
        """Teacher and student K-token continuations from the prefixes of `selected` (B, R) bool -> Windows."""
        return self.pipeline.call(self.pipeline.probe_windows(batch, selected))

    def solve(self, windows):
        """Fills windows.d_ot and windows.plan with the configured OT solver."""
        windows.d_ot, windows.plan = window_distance(self.embedding, windows.teacher_ids, windows.teacher_mask,
                                                     windows.student_ids, windows.student_mask, self.cfg)
        return windows


@contextlib.contextmanager
def open_session(cfg):
    """A Session on the config's servers (built-in ones launched here and stopped on exit)."""
    from topd_ds.data import load_prompts
    from topd_ds.engines.supervisor import Supervisor
    from topd_ds.pipeline import Pipeline
    from topd_ds.train import load_teacher_tables, load_tokenizers, make_clients_factory, start_servers

    tokenizer = load_tokenizers(cfg)
    prompts = load_prompts(cfg.data.prompts, tokenizer=tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens,
                           prompt_template=cfg.data.prompt_template)
    head, embedding = load_teacher_tables(cfg)
    servers, pipeline = Supervisor(), None
    try:
        student_url, teacher_url = start_servers(cfg, cfg.model.student, servers)
        make_clients = make_clients_factory(cfg, student_url, teacher_url, teacher_hidden_size=head.shape[1])
        pipeline = Pipeline(prompts=[p.prompt_ids for p in prompts], make_clients=make_clients, teacher_head=head,
                            embedding=embedding, cfg=scoring_only(cfg), start_step=0,
                            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, weight_version=0,
                            produce=False)
        yield Session(cfg, tokenizer, head, embedding, pipeline)
    finally:
        if pipeline is not None:
            pipeline.close()
        servers.stop_all()


def window_distance(embedding, teacher_ids, teacher_mask, student_ids, student_mask, cfg):
    """D_OT between teacher and student windows (M, K) with the config's cost and solver -> (M,) float32."""
    from topd_ds.ot import ot_distance
    from topd_ds.ot.cost import token_cost

    cost = token_cost(embedding, teacher_ids, student_ids, metric=cfg.topd.cost)  # (M, K, K)
    opts = dict(eps=cfg.ot.eps, max_iter=cfg.ot.max_iter, tol=cfg.ot.tol) if cfg.ot.solver == "sinkhorn" else {}
    result = ot_distance(cost, mask_a=teacher_mask, mask_b=student_mask, solver=cfg.ot.solver, **opts)
    return result.distance.float().cpu(), result.plan.float().cpu()
