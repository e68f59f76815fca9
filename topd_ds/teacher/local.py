"""The teacher on the training ranks (teacher.scoring: local): its final hidden states for the losses, computed
where the loss is, so no hidden state crosses HTTP.

    teacher = distributed.build_teacher_engine(cfg.model.teacher, ds_config)   # every rank, if needs_local(cfg)
    hidden = response_hidden(teacher, sequences, prompt_lens, pad_id=0, device=dev)  # per sequence (R_b, H)
    rows = with_packed_hidden(teacher, rows, device=dev)  # stage-1 packed rows (kd_packing.KDRows), before sharding

What the teacher is: a DeepSpeed engine with ZeRO-3 and no optimizer (deepspeed.initialize(model=..., config=...)
with zero_optimization.stage 3 and no "optimizer": DeepSpeed 0.19.8 then wraps the model in DeepSpeedZeRoOffload,
runtime/engine.py `_configure_zero_optimizer`, the "ZeRO-Inference" parameter partitioning alone). Each rank holds
1/N of every parameter; a forward all-gathers one module's parameters at a time and frees them after. Chosen over
deepspeed.init_inference (AutoTP): tensor parallelism splits one forward over the ranks, so every rank would have
to run every rank's micro-batch (the training ranks hold different sequences) and the teacher would be replicated
per TP group, not partitioned over all N ranks; ZeRO-3 lets each rank run its own micro-batch with the same 1/N
partition as the student, and treats Qwen3-MoE's fused experts like any parameter. DeepSpeed-Chat keeps its
reference model the same way beside a ZeRO-3 actor (DeepSpeedExamples applications/DeepSpeed-Chat/dschat/rlhf/
rlhf_engine.py `_init_ref`: get_eval_ds_config(stage 3), deepspeed.initialize(model=ref_model, config=...), no
optimizer). Not measured on a GPU here (none was available).

The teacher's lm_head is replaced by an Identity before DeepSpeed wraps the model: the losses apply the teacher's
lm_head themselves, chunk by chunk (teacher.tables.load_teacher_tables reads it), so the engine neither stores nor gathers
the (V, H) head, and with logits_to_keep=0 the model's "logits" are its final normed hidden states (the
`hidden_states[-1]` the teacher server returns), with no tuple of every layer's states kept alive.

Collectives: ZeRO-3 all-gathers each layer's parameters inside the forward, so every rank must call the
teacher's forward the same number of times in the same order. The callers call it once per micro-batch, before
the student's forward, on every rank (every rank has the same number of micro-batches: train.check_equal_share),
whatever the rank's data. Qwen3-MoE's experts (transformers 5.x `Qwen3MoeExperts`) are two fused parameters per
layer, so a rank gathers all experts of a layer whichever experts its tokens route to (docs/SCALING.md counts
that cost); an experts module that called per-expert submodules only for the routed tokens would make the
gathers differ by rank and hang the job (tests/test_local_teacher.py runs two ranks routed differently).

Attention: the teacher is loaded with `ATTN`, transformers' sdpa run causally per sample of each row
(sequence_parallel.packed_sdpa, the spans between position-id restarts) with no mask built: packed stage-1 rows
(positions restart per sample) and right-padded stage-2 rows (positions keep increasing over the padding, which
only follows real tokens) both come out exact without any (T, T) mask, and SDPA keeps its flash kernel on CUDA.
It is never the student's Ulysses attention (registered under another name, for the student's head counts).

Memory per forward (no grad): activations of one layer at a time for (B, T) tokens, the final (B, T, H) states
and their float32 copy for the loss; one layer's gathered parameters (docs/SCALING.md section 4).
"""

import dataclasses

import torch

from topd_ds.loss import packing

_ALL_ROWS = 0  # logits_to_keep=0: the (identity) head applied to every row
ATTN = "topd_teacher_sdpa"  # the attn_implementation the teacher is loaded with (register_attention)


def register_attention() -> str:
    """Register `ATTN` with transformers (idempotent) and return it: per-sample causal sdpa from position_ids,
    and a mask function that builds no mask (the attention needs none)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from topd_ds.loss.sequence_parallel import packed_sdpa

    AttentionInterface.register(ATTN, packed_sdpa)
    AttentionMaskInterface.register(ATTN, lambda *args, **kwargs: None)
    return ATTN


def needs_local(cfg) -> bool:
    """Whether this run loads the teacher on its ranks: teacher.scoring local and a loss that reads the teacher's
    full distribution (stage 1 with kd.kd_ratio > 0, stage 2 with opd.estimator full)."""
    if cfg.teacher.scoring != "local":
        return False
    return cfg.kd.kd_ratio > 0 if cfg.train.stage == "kd" else cfg.opd.estimator == "full"


def drop_lm_head(model):
    """Replace the causal LM's lm_head by an Identity (before deepspeed.initialize): its logits become the final
    hidden states. The head's parameter stays alive if tied to the input embeddings, else it is freed."""
    model.lm_head = torch.nn.Identity()
    return model


@torch.no_grad()
def final_hidden(teacher, ids, positions, attention_mask) -> torch.Tensor:
    """(B, T, H) final normed hidden states of the teacher (an engine or a model whose lm_head is an Identity),
    float32 as the server path hands them to the losses."""
    out = teacher(input_ids=ids, position_ids=positions, attention_mask=attention_mask, use_cache=False,
                  logits_to_keep=_ALL_ROWS)
    return out.logits.float()


def response_hidden(teacher, sequences, prompt_lens, *, pad_id: int, device) -> list:
    """Per sequence b a (len_b - P_b, H) float32 tensor: row j is the teacher's state predicting response token
    P_b + j (rows P_b - 1 .. len_b - 2 of its forward), as the teacher server's scoring gives them. One forward
    over the sequences right-padded to one (B, T) grid (the student's layout, objective.student_hidden) with no
    attention mask: pads follow every real token, so causal attention never lets a real row see them."""
    empty = torch.zeros(0, dtype=torch.long)
    packed = packing.pack(sequences, empty, empty, torch.zeros(0, 0, dtype=torch.long),
                          torch.zeros(0, 0, dtype=torch.bool), pad_id=pad_id).to(device)
    hidden = final_hidden(teacher, packed.ids, packed.positions, None)  # (B, T, H)
    return [hidden[b, p - 1:len(s) - 1] for b, (s, p) in enumerate(zip(sequences, prompt_lens))]


def with_packed_hidden(teacher, rows, *, device):
    """kd_packing.KDRows with teacher_hidden (R, T, H) from one teacher forward over the same packed rows and
    position ids as the student's (attention_mask None: transformers keeps attention within each sample), zero
    where the loss reads nothing (as pack_samples fills them from the server's states). Call it on the whole rows,
    before KDRows.shard: under sequence parallelism the teacher runs the whole row on every rank of the Ulysses
    group (its attention is `ATTN`, never the Ulysses attention, which is registered for the student's head
    counts), and each rank keeps its shard; sp x the teacher's forward FLOPs of a row, no extra collective."""
    hidden = final_hidden(teacher, rows.ids.to(device), rows.positions.to(device), None)  # (R, T, H)
    hidden = hidden.masked_fill_(~rows.mask.to(device)[..., None], 0.0)
    return dataclasses.replace(rows, teacher_hidden=hidden)
