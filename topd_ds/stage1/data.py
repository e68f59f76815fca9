"""Stage 1, off-policy KD: the teacher's responses (a JSONL file) -> forward KL + CE batches.

Paper Appendix B.1: the teacher samples responses (temperature 0.6, top_p 0.95) for a prompt set; the
student then trains on (prompt, teacher response) pairs with forward KL(p_T || p_S) mixed with CE at
kd_ratio 0.5. The responses are sampled before training by `topd-ds sample` (topd_ds/stage1/sample.py: resumable,
with a progress bar); training only reads them, so no rank waits on the teacher's sampling inside a collective.
At 16k tokens (paper: sample packing, sequence parallelism 2): kd.pack_to packs a micro-batch's samples into
rows (topd_ds/loss/kd_packing.py) and train.sequence_parallel_size shards one packed row over DeepSpeed-Ulysses ranks
(topd_ds/loss/sequence_parallel.py; docs/TRAINING.md "Stage 1 at 16k tokens").
With teacher.scoring local the batches carry no teacher states and no teacher server is asked for any while
stage 1 trains: each rank runs the teacher on its own micro-batch (topd_ds/teacher/local.py), on the same rows as
the student's forward (padded, or packed with the same position ids).
"""

import random

import torch

from topd_ds.loss import sequence_parallel
from topd_ds.loss.objective import stage1_loss, stage1_loss_packed
from topd_ds.rollout.batch import KDBatch
from topd_ds.teacher.local import response_hidden


class Stage1Data:
    """Teacher samples for stage 1, with the teacher's hidden states fetched per batch (teacher.scoring server)."""

    def __init__(self, records, pipeline, cfg):
        self.records, self.pipeline, self.cfg = records, pipeline, cfg

    @classmethod
    def prepare(cls, cfg, prompts, pipeline, config_path: str = "CONFIG.yaml"):
        """The records stage 1 trains on: the data's own responses (kd.source=dataset) or the teacher's, read
        from the file `topd-ds sample` wrote (a ConfigError naming that command when it is missing)."""
        n_total = cfg.kd.n_samples or len(prompts)
        if cfg.kd.source == "dataset":  # the data's own responses (ground truth for arith): nothing to sample
            records = [{"index": i, "prompt_ids": prompts[i % len(prompts)].prompt_ids,
                        "response_ids": prompts[i % len(prompts)].response_ids} for i in range(n_total)]
            return cls(records, pipeline, cfg)
        from topd_ds.stage1.sample import load_responses

        return cls(load_responses(cfg, prompts.prompt_ids, config_path=config_path), pipeline, cfg)

    def batch(self, step: int) -> KDBatch:
        """global_batch_size records chosen by (seed, step): a resumed run sees the same batches."""
        n = self.cfg.train.global_batch_size
        epoch, offset = divmod(step * n, len(self.records))
        order = list(range(len(self.records)))
        random.Random(self.cfg.train.seed * 1_000_003 + epoch).shuffle(order)
        chosen = [self.records[order[(offset + i) % len(order)]] for i in range(n)]
        seqs = [r["prompt_ids"] + r["response_ids"] for r in chosen]
        plens = [len(r["prompt_ids"]) for r in chosen]
        # pure CE: the teacher's distribution is not used; local: the ranks compute it (stage1_step_loss)
        if self.cfg.kd.kd_ratio == 0 or self.cfg.teacher.scoring == "local":
            return KDBatch(step=step, sequences=seqs, prompt_lens=plens, teacher_hidden=None)
        scores = self.pipeline.call(self.pipeline.teacher.score(seqs, start=plens, return_hidden=True))
        hidden = [torch.as_tensor(sc.hidden_states)[p - 1:len(s) - 1]  # the server dtype; transport casts
                  for sc, s, p in zip(scores, seqs, plens)]
        return KDBatch(step=step, sequences=seqs, prompt_lens=plens, teacher_hidden=hidden)


def stage1_step_loss(model, batch: KDBatch, idx, *, cfg, teacher_head, pad_id: int, device, teacher=None):
    """The micro-batch `idx`'s stage-1 loss: padded rows (kd.pack_to 0, no sequence parallelism), else packed
    rows (kd.pack_to), one row sharded over the Ulysses group under train.sequence_parallel_size > 1.
    `teacher`: the local teacher (None: the states come with the batch, or kd_ratio is 0); its forward runs here
    once per micro-batch on every rank, before the student's, on the rows the student's forward sees."""
    hidden = None if batch.teacher_hidden is None else [batch.teacher_hidden[i] for i in idx]
    seqs, plens = [batch.sequences[i] for i in idx], [batch.prompt_lens[i] for i in idx]
    group = sequence_parallel.group()
    if cfg.kd.pack_to or group is not None:
        return stage1_loss_packed(model, seqs, plens, hidden, cfg=cfg, teacher_head=teacher_head, pad_id=pad_id,
                                  device=device, sp_group=group, teacher=teacher)
    if teacher is not None:
        hidden = response_hidden(teacher, seqs, plens, pad_id=pad_id, device=device)
    return stage1_loss(model, seqs, plens, hidden, cfg=cfg, teacher_head=teacher_head, pad_id=pad_id, device=device)
