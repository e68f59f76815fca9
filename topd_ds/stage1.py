"""Stage 1, off-policy KD: teacher samples -> a JSONL dataset (resumable) -> forward KL + CE batches.

Paper Appendix B.1: the teacher samples responses (temperature 0.6, top_p 0.95) for a prompt set; the
student then trains on (prompt, teacher response) pairs with forward KL(p_T || p_S) mixed with CE at
kd_ratio 0.5. Sampling appends one JSON line per response and fsyncs each chunk, so a restart keeps every
complete line, drops a torn last line, and continues with the next prompt.
"""

import dataclasses
import json
import os
import random

import torch

from topd_ds.engines.protocol import SamplingParams
from topd_ds.objective import stage1_loss

SAMPLE_CHUNK = 64  # prompts per generate call while sampling the dataset


@dataclasses.dataclass
class KDBatch:
    step: int
    sequences: list
    prompt_lens: list
    teacher_hidden: list
    weight_version: int = 0
    stats: dict = dataclasses.field(default_factory=dict)


def _complete_lines(path: str) -> list:
    """Records of every complete line of `path`; a torn last line (crash mid-write) is cut off the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    keep = data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return [json.loads(line) for line in keep.decode("utf-8").splitlines() if line.strip()]


class Stage1Data:
    """Teacher samples for stage 1, with the teacher's hidden states fetched per batch."""

    def __init__(self, records, pipeline, cfg):
        self.records, self.pipeline, self.cfg = records, pipeline, cfg

    @classmethod
    def prepare(cls, cfg, prompts, pipeline, tokenizer):
        n_total = cfg.kd.n_samples or len(prompts)
        if cfg.kd.source == "dataset":  # the data's own responses (ground truth for arith): nothing to sample
            records = [{"index": i, "prompt_ids": prompts[i % len(prompts)].prompt_ids,
                        "response_ids": prompts[i % len(prompts)].response_ids} for i in range(n_total)]
            return cls(records, pipeline, cfg)
        path = cfg.data.responses or os.path.join(cfg.run_dir, "teacher_samples.jsonl")
        records = _complete_lines(path)
        if len(records) < n_total:
            print(f"stage 1: sampling {n_total - len(records)} teacher responses into {path} "
                  f"({len(records)} already there)", flush=True)
        params = SamplingParams(max_new_tokens=cfg.kd.max_new_tokens, temperature=cfg.kd.sample_temperature,
                                top_p=cfg.kd.sample_top_p, stop_token_ids=(tokenizer.eos_token_id,))
        with open(path, "a", encoding="utf-8") as f:
            while len(records) < n_total:
                idx = list(range(len(records), min(n_total, len(records) + SAMPLE_CHUNK)))
                batch_prompts = [prompts[i % len(prompts)].prompt_ids for i in idx]
                chunk_params = dataclasses.replace(params, seed=cfg.train.seed * 1_000_003 + idx[0])
                groups = pipeline.call(pipeline.teacher.generate(batch_prompts, chunk_params, n=1))
                for i, p, g in zip(idx, batch_prompts, groups):
                    rec = {"index": i, "prompt_ids": p, "response_ids": g[0].output_ids,
                           "finish_reason": g[0].finish_reason}
                    f.write(json.dumps(rec) + "\n")
                    records.append(rec)
                f.flush()
                os.fsync(f.fileno())
        return cls(records[:n_total], pipeline, cfg)

    def batch(self, step: int) -> KDBatch:
        """global_batch_size records chosen by (seed, step): a resumed run sees the same batches."""
        n = self.cfg.train.global_batch_size
        epoch, offset = divmod(step * n, len(self.records))
        order = list(range(len(self.records)))
        random.Random(self.cfg.train.seed * 1_000_003 + epoch).shuffle(order)
        chosen = [self.records[order[(offset + i) % len(order)]] for i in range(n)]
        seqs = [r["prompt_ids"] + r["response_ids"] for r in chosen]
        plens = [len(r["prompt_ids"]) for r in chosen]
        if self.cfg.kd.kd_ratio == 0:  # pure CE: the teacher's distribution is not used
            return KDBatch(step=step, sequences=seqs, prompt_lens=plens, teacher_hidden=None)
        scores = self.pipeline.call(self.pipeline.teacher.score(seqs, start=plens, return_hidden=True))
        hidden = [torch.as_tensor(sc.hidden_states)[p - 1:len(s) - 1]  # the server dtype; transport casts
                  for sc, s, p in zip(scores, seqs, plens)]
        return KDBatch(step=step, sequences=seqs, prompt_lens=plens, teacher_hidden=hidden)


def stage1_step_loss(model, batch: KDBatch, idx, *, cfg, teacher_head, pad_id: int, device):
    hidden = None if batch.teacher_hidden is None else [batch.teacher_hidden[i] for i in idx]
    return stage1_loss(model, [batch.sequences[i] for i in idx], [batch.prompt_lens[i] for i in idx],
                       hidden, cfg=cfg, teacher_head=teacher_head,
                       pad_id=pad_id, device=device)
