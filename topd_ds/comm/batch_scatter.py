"""A step's batch from rank 0 to the ranks: each rank gets its own sequences as tensors (`transport`).

    local = share_batch(tp, batch if rank0 else None, step=step, hidden_dtype=torch.bfloat16)
    # local is None when rank 0 stopped (a ServerFailure), else a Batch / KDBatch of this rank's sequences

Sequence i goes to rank i % world (round robin, as the micro-batches always were). A rank's local batch
holds its sequences re-indexed 0..n-1 in order, their per-token tensors, and the probe windows of those
sequences with `seq_index` re-indexed the same way; rank 0 trains on a local batch built the same way
(so every rank runs the same code on the same kind of data) and keeps the full batch for logging.
Teacher hidden states travel in `hidden_dtype`, the student model's dtype (bf16 on GPUs; exact for a bf16
teacher server, whose states are bf16 values) and are handed to the loss in float32, as before.
"""

from __future__ import annotations

import dataclasses

import torch

from topd_ds.rollout.batch import Batch, Windows
from topd_ds.comm.transport import STATUS_DATA

KIND_BATCH, KIND_KD = 1, 2
PER_SEQUENCE = ("sequence", "prompt_len", "teacher_hidden", "teacher_topk_ids", "teacher_topk_logprobs",
                "teacher_token_logprobs", "marked")
WINDOW_FIELDS = ("position", "teacher_ids", "teacher_mask", "student_ids", "student_mask", "plan", "d_ot")
NAMES = PER_SEQUENCE + tuple("window_" + f for f in WINDOW_FIELDS)


def owners(n_sequences: int, world: int) -> list[int]:
    """Rank of each sequence: i % world."""
    return [i % world for i in range(n_sequences)]


def replicate_for_groups(fields: dict, n_sequences: int, world: int, sp: int) -> tuple[dict, list[int]]:
    """(fields, owner) that give sequence i to every rank of Ulysses group i % (world / sp): the sp ranks of a
    group (consecutive, sequence_parallel.data_parallel_rank) each take a shard of the same sequences."""
    dp = world // sp
    owner = [(i % dp) * sp + j for i in range(n_sequences) for j in range(sp)]
    return {k: [v for v in values for _ in range(sp)] for k, values in fields.items()}, owner


def batch_fields(batch, *, hidden_dtype: torch.dtype) -> dict:
    """{name: [tensor per sequence]} of a Batch or KDBatch (absent parts left out)."""
    n = len(batch.sequences)
    fields = {"sequence": [torch.tensor(s, dtype=torch.int32) for s in batch.sequences],  # vocab < 2**31
              "prompt_len": [torch.tensor([p], dtype=torch.int64) for p in batch.prompt_lens]}
    if batch.teacher_hidden is not None:
        fields["teacher_hidden"] = [h.to(hidden_dtype) for h in batch.teacher_hidden]
    for name in ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_token_logprobs", "marked"):
        value = getattr(batch, name, None)
        if value is not None:
            fields[name] = list(value)
    windows = getattr(batch, "windows", None)
    if windows is not None:
        of_seq = [(windows.seq_index == b).nonzero(as_tuple=True)[0] for b in range(n)]  # order kept
        for f in WINDOW_FIELDS:
            value = getattr(windows, f)
            fields["window_" + f] = [value[rows] for rows in of_seq]
    return fields


def local_batch(got: dict, *, step: int, weight_version: int):
    """The Batch / KDBatch of this rank's sequences from Transport.scatter's answer."""
    from topd_ds.rollout.batch import KDBatch

    got = {k: ([t.cpu() for t in v] if isinstance(v, list) and v and torch.is_tensor(v[0]) else v)
           for k, v in got.items()}  # off the NCCL device: the objective moves what it needs, as before
    seqs = [s.tolist() for s in got["sequence"]]
    plens = [int(p[0]) for p in got["prompt_len"]]
    # bf16 on the wire (exact for a bf16 teacher server), fp32 for the loss's lm_head product as before
    hidden = None if got["teacher_hidden"] is None else [h.float() for h in got["teacher_hidden"]]
    if got["tag"] == KIND_KD:
        return KDBatch(step=step, sequences=seqs, prompt_lens=plens, teacher_hidden=hidden,
                       weight_version=weight_version)
    windows = None
    if got["window_position"] is not None:
        parts = {f: got["window_" + f] for f in WINDOW_FIELDS}
        seq_index = torch.cat([torch.full((len(p),), b, dtype=torch.long)
                               for b, p in enumerate(parts["position"])])
        windows = Windows(seq_index=seq_index, **{f: torch.cat(v) for f, v in parts.items()})
    return Batch(step=step, weight_version=weight_version, sequences=seqs, prompt_lens=plens,
                 teacher_hidden=hidden, teacher_topk_ids=got["teacher_topk_ids"],
                 teacher_topk_logprobs=got["teacher_topk_logprobs"],
                 teacher_token_logprobs=got["teacher_token_logprobs"], marked=got["marked"], windows=windows)


def share_batch(tp, batch, *, step: int, hidden_dtype: torch.dtype = torch.float32, sp: int = 1):
    """Every rank, once per step: this rank's local batch, or None when rank 0 passed None (it stops).

    Rank 0 passes the full batch (or None after a ServerFailure); the others pass None. sp > 1
    (train.sequence_parallel_size): the ranks of a Ulysses group all get their group's sequences."""
    if tp.rank == tp.src:
        if batch is None:
            tp.stop(what=f"batch of step {step + 1}")
            return None
        kind = KIND_KD if not isinstance(batch, Batch) else KIND_BATCH
        fields = batch_fields(batch, hidden_dtype=hidden_dtype)
        owner = owners(len(batch.sequences), tp.world)
        if sp > 1:
            fields, owner = replicate_for_groups(fields, len(batch.sequences), tp.world, sp)
        got = tp.scatter(fields, owner, names=NAMES, tag=kind,
                         ints=(batch.weight_version,), what=f"batch of step {step + 1}")
    else:
        got = tp.scatter(None, None, names=NAMES, what=f"batch of step {step + 1}")
    if got["status"] != STATUS_DATA:
        return None
    if not got["sequence"] and got["window_position"] is not None:
        got = {**got, **{"window_" + f: None for f in WINDOW_FIELDS}}  # no sequences here: no windows either
    return local_batch(got, step=step, weight_version=got["ints"][0])


def bytes_of(batch) -> int:
    """Bytes of the tensors of a local batch (what a rank trains on), for the logs and the benchmark."""
    total = 0
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, list) and v and torch.is_tensor(v[0]):
            total += sum(t.numel() * t.element_size() for t in v)
    return total
