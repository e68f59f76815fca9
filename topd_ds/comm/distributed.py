"""DeepSpeed glue: distributed start-up, the student engine, and consolidated weights out of ZeRO-3 shards.

    init_distributed()                                  # rank env for launcher-less runs, gloo on CPU
    engine = build_engine(cfg, ds_config)               # student under zero.Init when ZeRO-3 is on
    teacher = build_teacher_engine(teacher_dir, ds_config)  # teacher.scoring local: ZeRO-3, no optimizer
    save_consolidated(engine, out_dir, tokenizer)       # gathered layer by layer, written atomically

Everything here is collective: every rank calls these functions, rank 0 does the writing.
"""

import atexit
import datetime
import os
import socket
import sys

import torch

from topd_ds.fsutil import atomic_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(rank0_wait_s: float = 7200.0):
    """Start torch.distributed through DeepSpeed; a run without a launcher is world size 1 on 127.0.0.1.
    `rank0_wait_s`: the timeout of wait_for_rank0's gloo group (train.rank0_wait_s)."""
    if "RANK" not in os.environ:  # plain `python -m topd_ds.train` or pytest: no launcher set the rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if torch.distributed.is_initialized():
        return
    if not torch.cuda.is_available():
        # On the CPU, skip JIT-compiling DeepSpeed's shared-memory all-reduce op (45 s on a fresh machine, in
        # every rank the launcher starts): it serves only `inference_all_reduce` (AutoTP inference), which falls
        # back to torch.distributed without it; ZeRO training's collectives always go through torch.distributed
        # (gloo). The module object must be patched, not the name `deepspeed.comm.torch`, which resolves to
        # the torch package.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    make_wait_group(rank0_wait_s)


def leave_process_groups() -> None:
    """Destroy every process group of this process (a no-op when none is alive)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_LEAVE = {"registered": False}


def leave_at_exit() -> None:
    """Destroy the process groups when the interpreter exits, while it is still whole; train.main calls this once a
    run has finished. Neither torch nor DeepSpeed does it, and a gloo group left alive can abort the process at
    exit after a finished job (SIGABRT, "terminate called without an active exception": Gloo's worker threads still
    hold work objects during interpreter finalization; pytorch/pytorch#190489, and the abandoned #179291 that would
    have done this in init_process_group). Reproduced here with torch 2.13.0: 3 of 40 single-rank gloo processes
    aborted at exit, 0 of 40 that destroyed the group; in CI it failed two tests' rank processes. torch's
    distributed docs ask for destroy_process_group() at the end of a program for NCCL too; torch 2.13.0's
    destroy_process_group() calls shutdown() on every group in name order (distributed_c10d.py:2402-2407). On 8 GPUs
    that includes NCCL groups and the weight-sync group to the SGLang servers: not run here (no GPU). At exit, not at the end
    of train.main: a process that trains twice (the tests) keeps DeepSpeed's cached groups valid between runs. Only
    after a finished run: on an error path other ranks may still be inside a collective."""
    if not _LEAVE["registered"]:
        atexit.register(leave_process_groups)
        _LEAVE["registered"] = True


_WAIT = {"group": None, "timeout_s": None}  # the gloo group of wait_for_rank0 and its timeout


def make_wait_group(timeout_s: float):
    """The gloo group whose barrier is wait_for_rank0, with `timeout_s` as its timeout. Collective: every rank
    calls it once, at start-up (init_distributed does)."""
    if world_size() > 1:
        _WAIT["group"] = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    _WAIT["timeout_s"] = timeout_s


def wait_for_rank0(what: str):
    """Every rank: meet rank 0 once it has done `what` alone (an eval, building a batch, starting servers).

    The other ranks wait here, in a barrier of a gloo group whose timeout is train.rank0_wait_s, rather than in
    the next NCCL collective, whose process-group timeout (30 min) would kill the job with a message that names
    nothing. Past the timeout every waiting rank stops with one line naming `what`. Collective: every rank
    calls it at the same point of the loop (a rank that skips it would leave the others waiting)."""
    if world_size() == 1:
        return
    assert _WAIT["group"] is not None, "wait_for_rank0 before make_wait_group"
    try:
        torch.distributed.barrier(group=_WAIT["group"])
    except RuntimeError as err:
        from topd_ds.errors import TopdError

        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TopdError(f"rank {rank()}: waited {_WAIT['timeout_s']:g}s for rank 0 to finish {what} "
                        f"(train.rank0_wait_s); {first}") from None


def launched_world_size() -> int:
    """The number of ranks the launcher started (its WORLD_SIZE), known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_engine(model_dir: str, ds_config: dict, *, gradient_checkpointing: bool = False, lr_lambda=None,
                 sequence_parallel_size: int = 1):
    """The student as a DeepSpeed engine. Under ZeRO-3 the model is built inside zero.Init (through
    HfDeepSpeedConfig) so no rank ever holds the whole model; pretrained weights are loaded shard-wise.
    Without a "scheduler" in the ZeRO JSON, `lr_lambda(step) -> factor` drives the lr (torch LambdaLR).
    sequence_parallel_size > 1: DeepSpeed's Ulysses attention and groups (topd_ds/loss/sequence_parallel.py)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from topd_ds.loss import sequence_parallel

    attn = {}
    if sequence_parallel_size > 1:  # before from_pretrained: the student is loaded with the Ulysses attention
        attn = {"attn_implementation": sequence_parallel.setup(model_dir, sequence_parallel_size, ds_config)}
    stage3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    hf_ds = HfDeepSpeedConfig(ds_config) if stage3 else None  # must be alive while from_pretrained runs
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **attn)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    from topd_ds.loss.lm_head import attach_loss_head

    attach_loss_head(model)  # the losses apply the lm_head in chunks; DeepSpeed must hook the head now
    scheduler = None
    if lr_lambda is not None and "scheduler" not in ds_config:
        scheduler = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, lr_scheduler=scheduler,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           mpu=sequence_parallel.mpu())
    if hf_ds is not None:
        # A live HfDeepSpeedConfig would make every later from_pretrained (reference models, exports)
        # build under zero.Init too.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return engine


def teacher_ds_config(ds_config: dict, world: int) -> dict:
    """The local teacher's DeepSpeed config (teacher.scoring local): ZeRO-3 with no optimizer, so DeepSpeed only
    partitions and gathers parameters; the student's dtype and ZeRO-3 gather/offload settings (its stage3_*,
    offload_param and ZeRO++ hpZ / quantized-weight keys, which cut the gathers' inter-node traffic), and a
    batch size of 1 per rank (unused: the teacher never steps, and its batch keys must hold for all `world`
    ranks, not the student's data-parallel world under sequence parallelism)."""
    zero = {k: v for k, v in ds_config.get("zero_optimization", {}).items()
            if k.startswith("stage3_") or k in ("offload_param", "zero_hpz_partition_size", "zero_quantized_weights")}
    config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {**zero, "stage": 3}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    for key in ("bf16", "fp16"):
        if key in ds_config:
            config[key] = ds_config[key]
    return config


def build_teacher_engine(model_dir: str, ds_config: dict):
    """The teacher as a DeepSpeed ZeRO-3 engine with no optimizer, in eval mode, without grad, in the training
    dtype, its lm_head dropped (topd_ds/teacher/local.py says why and how it is called). Built under zero.Init (through
    HfDeepSpeedConfig), so no rank ever holds the whole teacher: each keeps 1/N of every parameter. Loaded with
    per-sample sdpa (teacher.ATTN), never the student's Ulysses attention. Collective: every rank calls it."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from topd_ds.teacher.local import drop_lm_head, register_attention

    config = teacher_ds_config(ds_config, world_size())
    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32
    hf_ds = HfDeepSpeedConfig(config)  # noqa: F841  (must be alive while from_pretrained runs)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=register_attention())
    finally:
        unset_hf_deepspeed_config()  # later from_pretrained calls (references, exports) build plain models
    model = drop_lm_head(model).eval().requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def gathered_state_dict(module) -> dict:
    """The full fp32 state dict on rank 0 (empty elsewhere), gathering one parameter at a time so
    no rank needs memory for more than one full layer on the accelerator."""
    import deepspeed

    state = {}
    params = dict(module.named_parameters())
    for name, param in params.items():
        if hasattr(param, "ds_id"):  # a ZeRO-3 partitioned parameter
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank() == 0:
                    state[name] = param.detach().to("cpu", torch.float32).clone()
        elif rank() == 0:
            state[name] = param.detach().to("cpu", torch.float32).clone()
    if rank() == 0:
        persistent = set(module.state_dict().keys())  # rotary caches etc. are not saved by save_pretrained
        for name, buf in module.named_buffers():
            if name in persistent and name not in state:
                state[name] = buf.detach().cpu().clone()
    return state


def save_consolidated(engine, out_dir: str, tokenizer=None, *, dtype=torch.float32) -> str:
    """Write the student as a plain `save_pretrained` dir at out_dir (temp dir, then rename). Collective."""
    module = engine.module
    state = gathered_state_dict(module)
    if rank() == 0:
        with atomic_dir(out_dir) as tmp:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir
