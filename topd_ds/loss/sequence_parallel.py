"""Stage-1 sequence parallelism with DeepSpeed's own Ulysses (Arctic Long Sequence Training), not a ring of ours.

    check(student_dir, sp, world)             # before any model: one line naming train.sequence_parallel_size
    attn = setup(student_dir, sp)             # after init_distributed, before from_pretrained(attn_implementation=attn)
    deepspeed.initialize(..., mpu=mpu())      # DeepSpeed reduces gradients over data x sequence ranks
    group()                                   # the Ulysses group of this rank (None without SP)

What DeepSpeed 0.19.8 gives (deepspeed/runtime/sequence_parallel/ulysses_sp.py): `UlyssesSPAttentionHF`, put in
place of a transformers attention function by `register_with_transformers`, takes each rank's 1/sp of the
tokens with all heads, all-to-alls q/k/v to all tokens with heads / sp, runs the core attention, and all-to-alls
back; it all-gathers position_ids so the core sees the whole row's. The mpu (`parallel_state_sp`) makes the
groups: ranks [i sp, (i + 1) sp) share a micro-batch; passed to deepspeed.initialize, ZeRO partitions and
reduces over all ranks and divides gradients by world / sp (engine.py, stage_1_and_2.py, stage3.py), so each
rank's loss is its share of the group's (objective.stage1_loss_packed) and the update is the plain one.

What it does not give for packed samples on sdpa: the wrapper drops the model's attention mask (ulysses_sp.py,
`uattn_wrapper`: `attention_mask = None` unless a flex BlockMask, which forward() then rebuilds as plain causal)
and relies on the core attention to read the gathered position_ids. flash_attention_2 does (varlen from
position_ids); sdpa does not: with no mask it runs is_causal over the whole row, so packed samples would attend
to each other. So the core registered here (`packed_sdpa`) cuts the row at the gathered position_ids' restarts and
runs sdpa once per sample with is_causal: block-diagonal attention without any (T, T) tensor, so SDPA keeps its
flash kernel on CUDA. (The earlier core built a dense (B, 1, T, T) bool mask per attention call; torch's SDPA
refuses flash for any mask (aten/src/ATen/native/transformers/sdp_utils_cpp.h, check_for_attn_mask: "Flash
Attention does not support non-null attn_mask") and turns a bool mask into a float one of the query dtype
(attention.cpp, convert_boolean_attn_mask): T^2 bytes + 2 T^2 bytes in bf16, 1.2 GB + 2.3 GB for a 34k-token
row, per layer call; docs/SCALING.md. Read, not run: no GPU here.) The
model's own mask for its shard is skipped (the mask function registered with it returns None), since Ulysses
would drop it anyway.
"""

import torch

from topd_ds.errors import ConfigError

ATTN = "topd_packed_sdpa"  # the attn_implementation name the student is loaded with under SP
_STATE = {"mpu": None, "size": 1, "scale": 1.0}


def loss_scale(ds_config: dict, sp: int, *, path: str = "train.deepspeed_config") -> float:
    """What each rank's loss share is multiplied by so that DeepSpeed's reduced gradient is the plain one.

    The Ulysses ranks' gradients sum to the gradient of the group's loss (each rank back-propagates its share;
    the all-to-all's backward carries the other ranks' parts). DeepSpeed 0.19.8 then divides the sum over all
    ranks by world / sp in ZeRO 0-2 (engine.py _reduce_non_expert_gradients, stage_1_and_2.py average_tensor)
    and in ZeRO-3's contiguous all-reduce (stage3.py __avg_scatter_contiguous_grads), but by the whole world in
    ZeRO-3's reduce-scatter (stage3.py __avg_scatter_grads -> coalesced_collectives.reduce_scatter_coalesced,
    `div_(world_sz)`), the default path (reduce_scatter true). So the share is scaled by sp there and by 1
    elsewhere; ZeRO-3 with reduce_scatter false takes either path per bucket (by bucket size), which no single
    scale fixes, and is refused."""
    if sp == 1:
        return 1.0
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        return 1.0
    if not zero.get("reduce_scatter", True):
        raise ConfigError(f"{path}: zero_optimization.reduce_scatter: must be true with train.sequence_parallel_size "
                          f"{sp} (DeepSpeed 0.19.8's ZeRO-3 averages gradients over world or world / sp depending "
                          f"on the bucket without it)")
    return float(sp)


def check(student_dir: str, sp: int, world: int):
    """One ConfigError line naming train.sequence_parallel_size when sp does not divide the ranks launched or the
    student's attention heads (Ulysses splits heads over the group; key/value heads must divide or be divided)."""
    if sp == 1:
        return
    if world % sp:
        raise ConfigError(f"train.sequence_parallel_size: {sp} does not divide the {world} rank(s) launched")
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(student_dir).get_text_config()
    heads, kv = arch.num_attention_heads, arch.num_key_value_heads
    if heads % sp or (kv % sp and sp % kv):
        raise ConfigError(f"train.sequence_parallel_size: {sp} must divide the student's {heads} attention heads "
                          f"and divide or be a multiple of its {kv} key/value heads ({student_dir})")


def packed_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query q sees key k <= q of the same sample (position_ids restart at 0 per sample).
    The reference of `packed_sdpa` in tests; the training path never builds it (T^2 bytes)."""
    sample = (position_ids == 0).cumsum(-1)  # (B, T)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (sample[:, :, None] == sample[:, None, :]))[:, None]


def sample_spans(position_ids: torch.Tensor) -> list:
    """[(start, stop), ..] of one row's samples: a new sample starts wherever position_ids is 0 (and at 0).
    position_ids (T,), on any device: one small host copy of the restart offsets."""
    starts = torch.nonzero(position_ids == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    stops = starts[1:] + [position_ids.shape[-1]]
    return list(zip(starts, stops))


def packed_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' sdpa attention where no mask came in, run causally per sample of the row: the samples are
    the spans between the restarts of `position_ids` (the whole row's, as Ulysses gathered them), so attention
    is block-diagonal and causal, the same as `packed_mask`, but nothing of size T x T is allocated and SDPA
    keeps its flash kernel on CUDA (no mask). q/k/v (B, H, T, D); returns ((B, T, H, D), None). Memory: the
    output plus each sample's attention workspace; time: one SDPA call per sample per layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    kwargs.pop("is_causal", None)
    pos = position_ids.expand(query.shape[0], -1)  # (B, T)
    rows = []
    for b in range(query.shape[0]):
        parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                        value[b:b + 1, :, s:e], None, is_causal=True, **kwargs)[0]
                 for s, e in sample_spans(pos[b])]            # each (1, e - s, H, D)
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def _no_mask(*args, **kwargs):
    return None  # the core attention builds the mask from the whole row's position_ids


def setup(student_dir: str, sp: int, ds_config: dict) -> str:
    """Register DeepSpeed's Ulysses attention for `sp` ranks (micro-batch of one packed row) over our packed sdpa
    core; make the sequence-parallel groups (once per process: DeepSpeed's groups are global). Returns the
    attn_implementation to load the student with. Collective (new_group): every rank calls it, after
    torch.distributed starts."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _STATE["scale"] = loss_scale(ds_config, sp)
    if _STATE["mpu"] is not None:  # a second engine in the same process (tests): same groups, same attention
        assert _STATE["size"] == sp, f"sequence parallelism set up for {_STATE['size']} ranks, asked for {sp}"
        return ATTN
    AttentionInterface.register(ATTN, packed_sdpa)
    AttentionMaskInterface.register(ATTN, _no_mask)
    _STATE["mpu"] = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=student_dir, core_attn_implementation=ATTN, sequence_parallel_size=sp,
        micro_batch_size=1, seq_length_is_variable=True)
    _STATE["size"] = sp
    return ATTN


def share_scale() -> float:
    """loss_scale of the engine set up last (1 without SP)."""
    return _STATE["scale"]


def mpu():
    """DeepSpeed's sequence-parallel state (parallel_state_sp), or None without SP."""
    return _STATE["mpu"]


def group():
    """This rank's Ulysses process group, or None without SP."""
    return None if _STATE["mpu"] is None else _STATE["mpu"].get_sequence_parallel_group()


def data_parallel_rank(rank: int, sp: int) -> int:
    """The micro-batch stream a rank trains on: the ranks of one Ulysses group (consecutive) share it."""
    return rank // sp
