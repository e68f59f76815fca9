"""The batch types that flow to the trainer (rank 0 builds them, every rank reads them): stage 2's `Batch`
(with its probe `Windows`) from the pipeline, stage 1's `KDBatch` from the teacher's sampled responses."""

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class Windows:
    """K-token probe windows of selected positions, padded to K. Rows of `plan` are teacher positions."""
    seq_index: torch.Tensor       # (M,) which sequence of the batch
    position: torch.Tensor        # (M,) token index t of the candidate; the prefix is sequence[:t]
    teacher_ids: torch.Tensor     # (M, K)
    teacher_mask: torch.Tensor    # (M, K) bool, False after an early EOS
    student_ids: torch.Tensor     # (M, K)
    student_mask: torch.Tensor    # (M, K)
    plan: torch.Tensor            # (M, K, K) transport plan (teacher i, student j)
    d_ot: torch.Tensor            # (M,)


@dataclasses.dataclass
class Batch:
    """Everything the trainer needs for one optimizer step, built ahead of time by the pipeline."""
    step: int
    weight_version: int
    sequences: list               # G*P lists of token ids: prompt + response
    prompt_lens: list             # where each response starts
    teacher_hidden: Optional[list] = None     # per sequence (T, H) final hidden states, response positions
    teacher_topk_ids: Optional[list] = None   # per sequence (R, k)
    teacher_topk_logprobs: Optional[list] = None
    teacher_token_logprobs: Optional[list] = None  # per sequence (R,)
    selection_score: Optional[list] = None    # per sequence (R,) the loss used to pick candidates
    marked: Optional[list] = None             # per sequence (R,) bool: cap at the sample median
    windows: Optional[Windows] = None         # real divergent points (topd only)
    candidate_d_ot: Optional[torch.Tensor] = None   # D_OT of every high-loss candidate
    candidate_false_alarm: Optional[torch.Tensor] = None
    low_loss_d_ot: Optional[torch.Tensor] = None
    stats: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class KDBatch:
    """Stage 1's batch: teacher responses (no probes); teacher_hidden is None under teacher.scoring local
    or kd_ratio 0."""
    step: int
    sequences: list
    prompt_lens: list
    teacher_hidden: list
    weight_version: int = 0
    stats: dict = dataclasses.field(default_factory=dict)
