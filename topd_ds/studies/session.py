"""What every study command shares: its config and output folder, the servers, and the pipeline's pieces.

A study reads the same YAML as `topd-ds train` (models, servers, rollout, topd.window, ot) plus
`key.path=value` overrides; it launches built-in servers when the config names no URL and stops them on exit.
Rollouts, teacher scoring (and, for local-correction, the labelled divergence points) come from
`Pipeline.build`, extra probes from `Pipeline.probe_windows` and D_OT from `Pipeline.solve`, so a study
measures what training would see.
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


def with_mode(cfg, mode: str):
    """The config with topd.mode replaced: "opd" stops Pipeline.build after rollouts and teacher scoring, "topd"
    also probes and labels the high-loss candidates exactly as training does. The studies run in one process
    with no training ranks to hold a local teacher, so the teacher's distribution comes from its server
    (teacher.scoring = server) whatever the config says: they are tools for small models."""
    return dataclasses.replace(cfg, topd=dataclasses.replace(cfg.topd, mode=mode),
                               teacher=dataclasses.replace(cfg.teacher, scoring="server"))


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
        """Fills windows.d_ot and windows.plan with the configured ground cost and OT solver."""
        return self.pipeline.solve(windows)


@contextlib.contextmanager
def open_session(cfg, *, mode: str = "opd"):
    """A Session on the config's servers (built-in ones launched here and stopped on exit); its batches are
    built under topd.mode = `mode` (see `with_mode`)."""
    from topd_ds.data import open_prompt_set
    from topd_ds.engines.supervisor import Supervisor
    from topd_ds.rollout.pipeline import Pipeline
    from topd_ds.teacher.tables import load_teacher_tables
    from topd_ds.data.tokenizers import load_tokenizers
    from topd_ds.engines.startup import make_clients_factory, start_servers

    tokenizer = load_tokenizers(cfg)
    prompts = open_prompt_set(cfg.data.prompts, tokenizer, cfg.data)
    head, embedding = load_teacher_tables(cfg)
    servers, pipeline = Supervisor(), None
    try:
        student_url, teacher_url = start_servers(cfg, cfg.model.student, servers)
        make_clients = make_clients_factory(cfg, student_url, teacher_url, teacher_hidden_size=head.shape[1])
        pipeline = Pipeline(prompts=prompts.prompt_ids, make_clients=make_clients, teacher_head=head,
                            embedding=embedding, cfg=with_mode(cfg, mode), start_step=0,
                            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, weight_version=0,
                            produce=False)
        yield Session(cfg, tokenizer, head, embedding, pipeline)
    finally:
        if pipeline is not None:
            pipeline.close()
        servers.stop_all()
