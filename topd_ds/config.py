"""Typed config: YAML (+ `--key.path=value` overrides) -> frozen dataclasses, validated before any work starts.

One frozen dataclass per concern; every field is typed, defaulted and commented (the paper's value where it
has one, arXiv 2606.00305 Appendix B). A wrong key, type, range or missing file is one `ConfigError` line
naming the key path, e.g. `topd.window: must be >= 1, got 0`. The DeepSpeed part is a ZeRO JSON named by
`train.deepspeed_config`; `resolve_deepspeed_config` fills its "auto" batch keys from the YAML and rejects
contradictions.

    cfg = load_config("configs/demo.yaml", overrides=["train.steps=10"])
    ds = resolve_deepspeed_config(cfg, world_size=2)
"""

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from topd_ds.errors import ConfigError, TopdError


def _f(default, doc: str = "", **checks):
    """A dataclass field with a docstring and range checks: ge, gt, le, lt, path ("file" | "dir")."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, **checks})
    return field(default=default, metadata={"doc": doc, **checks})


@dataclass(frozen=True)
class ModelConfig:
    student: str = _f("", "student model dir (save_pretrained layout); trained and exported", path="dir")
    teacher: str = _f("", "teacher model dir: its servers load it, the trainer reads its lm_head (and embeddings), "
                          "and with teacher.scoring local every training rank loads a ZeRO-3 partition of it",
                      path="dir")
    dtype: Literal["auto", "float32", "bfloat16"] = _f("auto", "auto: bfloat16 on GPU, float32 on CPU")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (long sequences)")
    ot_embedding: Literal["teacher", "student"] = _f("teacher", "whose input embeddings define the OT ground cost")


@dataclass(frozen=True)
class TeacherConfig:
    scoring: Literal["server", "local"] = _f(
        "server", "where the teacher's full-vocabulary distribution for the losses is computed: server = final "
        "hidden states from teacher_server (JSON; small runs, the CPU demo); local = the teacher runs on the "
        "training ranks, partitioned by ZeRO-3 like the student, and the teacher server only samples, probes "
        "and answers top-k logprobs for candidate selection (the paper's shapes; docs/SCALING.md section 4); local "
        "needs a loss that reads the full distribution (kd.kd_ratio > 0 in stage 1, opd.estimator full in stage 2)")


@dataclass(frozen=True)
class DataConfig:
    """Prompt sets (docs/DATA.md): JSONL, Parquet or datasets.save_to_disk folders; chat templates; long prompts."""
    prompts: str = _f("", "prompt set for stage 2 rollouts and stage 1 teacher sampling: .jsonl, .parquet, a folder "
                          "of .parquet files or a datasets.save_to_disk folder", path="any")
    eval: Optional[str] = _f(None, "set with answers for accuracy during training (same formats)", path="any")
    responses: Optional[str] = _f(None, "stage 1: JSONL of teacher responses, written by `topd-ds sample` (default: run_dir/teacher_samples.jsonl)")
    fields: dict = _f({}, "role -> column for data that names them differently, e.g. {prompt: instruction, "
                          "answer: gt}; roles: prompt, messages, response, solution, answer")
    rows: str = _f("", "start:stop slice of the source's rows (paper: stage 2 on rows 20000:30000); empty: all")
    chat_template: str = _f("auto", "auto: the tokenizer's own (tokenizer_config.json / chat_template.jinja), "
                                    "plain <bos>+text if it has none; none: plain text; else a Jinja template "
                                    "or a .jinja file")
    system_prompt: Optional[str] = _f(None, "system turn added to rows that have none (needs a chat template)")
    prompt_suffix: str = _f("", "appended to the user's last turn; preset 'boxed' = the paper's math "
                                "instruction (docs/DATA.md)")
    prompt_template: str = _f("{prompt}", "wraps the user's text; {prompt} is replaced (other braces are kept)")
    enable_thinking: Optional[bool] = _f(None, "passed to the chat template when set (Qwen3 hybrid models; paper: "
                                               "thinking disabled)")
    max_prompt_tokens: int = _f(800, "prompt length limit in tokens, template included (paper: prompt_max_len "
                                     "800)", ge=1)
    on_long_prompt: Literal["skip", "error"] = _f("skip", "skip: over-long prompts are left out and counted "
                                                          "(data/long_prompts_skipped); error: stop on the first")
    check_rows: int = _f(2000, "rows parsed, templated and tokenised at start-up (all of a smaller set); "
                                "later rows are checked when drawn", ge=1)
    shuffle: bool = _f(True, "shuffle prompts each epoch (seeded)")


@dataclass(frozen=True)
class ServerConfig:
    urls: list = _f([], "server URLs (data-parallel replicas) or one sglang_router URL; empty: launch the built-in server")
    router: bool = _f(False, "urls[0] is an sglang_router: send everything there")
    api_key: Optional[str] = _f(None, "bearer token (SGLang --api-key); also read from $TOPD_API_KEY")
    device: str = _f("cpu", "device of a built-in server the trainer launches (cpu | cuda | cuda:N)")
    timeout_s: float = _f(300.0, "per-request timeout", gt=0)
    max_retries: int = _f(4, "retries on connection errors and 5xx", ge=0)
    max_concurrency: int = _f(64, "requests in flight per server", ge=1)
    max_restarts: int = _f(3, "server failures in a row (after the client's retries) the trainer recovers from: "
                              "each restarts a built-in server with the current weights (urls: waits up to "
                              "timeout_s for /health) and rebuilds the batch; one more stops the run with a "
                              "checkpoint", ge=0)


@dataclass(frozen=True)
class RolloutConfig:
    n_per_prompt: int = _f(4, "G rollouts per prompt (paper: 4)", ge=1)
    prompts_per_step: int = _f(1, "prompts per optimizer step; sequences per step = prompts_per_step * n_per_prompt", ge=1)
    temperature: float = _f(1.0, "rollout sampling temperature (paper: 1.0)", gt=0)
    top_p: float = _f(1.0, "rollout top_p (paper: 1.0)", gt=0, le=1)
    max_new_tokens: int = _f(8000, "rollout length cap (paper: generate_max_len 8000)", ge=1)


@dataclass(frozen=True)
class KDConfig:
    """Stage 1: off-policy KD on teacher samples with forward KL + CE."""
    kd_ratio: float = _f(0.5, "weight of forward KL vs CE (paper: 0.5)", ge=0, le=1)
    temperature: float = _f(1.0, "distillation temperature", gt=0)
    n_samples: int = _f(0, "teacher samples to draw (0: one per prompt in data.prompts)", ge=0)
    sample_temperature: float = _f(0.6, "teacher sampling temperature (paper: 0.6)", gt=0)
    sample_top_p: float = _f(0.95, "teacher sampling top_p (paper: 0.95)", gt=0, le=1)
    max_new_tokens: int = _f(16384, "teacher sample length cap (paper: 16384)", ge=1)
    source: Literal["teacher", "dataset"] = _f("teacher", "teacher: sample the teacher; dataset: the 'response' field of data.prompts (with kd_ratio 0: supervised ground-truth control)")
    pack_to: int = _f(0, "sample packing: a micro-batch's samples concatenated into rows of up to this many tokens, "
                         "position_ids restarting per sample, attention kept within each sample (paper: 16384); "
                         "0: one sample per row, padded (with train.sequence_parallel_size > 1 a micro-batch is always "
                         "one packed row)", ge=0)


@dataclass(frozen=True)
class OPDConfig:
    """Stage 2 token-level loss: reverse KL(p_S || p_T) on the student's rollouts."""
    estimator: Literal["full", "topk", "sampled"] = _f("full", "full vocab (teacher hidden states + lm_head), teacher top-k, or sampled token")
    top_k: int = _f(20, "teacher top-k for estimator=topk", ge=1)
    chunk_size: int = _f(1024, "sequence chunk for full-vocab losses (bounds memory)", ge=1)
    reduction: Literal["token", "sequence", "batch"] = _f("token", "how per-token losses are averaged (docs/LOSSES.md)")
    cut_after_first_error: Literal["none", "deque", "deque_alt"] = _f(
        "none", "a diagnostic for the built-in tasks (issue 25, topd_ds/tasks/oracle_cut.py): the task's checker cuts "
                "each rollout after its first invalid token, so OPD never trains on prefixes after an error")


@dataclass(frozen=True)
class TOPDConfig:
    mode: Literal["opd", "opd_dw_low_ot", "opd_dw_high_ot", "topd"] = _f("topd", "paper Table 1/2 rows")
    window: int = _f(50, "K: probing window length (paper: 50)", ge=1)
    candidate_fraction: float = _f(0.0225, "high-loss candidates per sequence (paper: m/N = 218/9688)", gt=0, le=1)
    candidate_count: int = _f(0, "fixed candidates per sequence instead of a fraction (0: use the fraction)", ge=0)
    false_alarm: Literal["quantile", "threshold", "low_loss_range"] = _f("quantile", "how low-divergence candidates are found")
    false_alarm_quantile: float = _f(0.3, "bottom-q of candidates' D_OT are false alarms (paper: 0.3)", ge=0, le=1)
    false_alarm_threshold: float = _f(0.0, "D_OT at or below this is a false alarm (false_alarm=threshold)", ge=0)
    low_loss_probes: int = _f(4, "low-loss probes per sequence to calibrate false_alarm=low_loss_range", ge=0)
    lam: float = _f(1.0, "lambda: weight of the trajectory loss (paper leaves it unstated). With traj_reduction sum it "
                           "must shrink ~1/K: the deque sweep's 0.003 at K = 16, 0.001 in the K = 50 paper config", ge=0)
    probe_temperature: float = _f(1.0, "sampling temperature of both models' K-token probes", gt=0)
    cost: Literal["cosine", "sqeuclidean"] = _f("cosine", "OT ground cost on token embeddings")
    # beyond the paper (issue 25; docs/LOSSES.md "Trajectory targets: checked and varied"); defaults = the paper
    traj_targets: Literal["paper", "until_divergence"] = _f(
        "paper", "L_traj's soft targets: paper = from the OT plan at every student window position; "
                 "until_divergence = only up to the windows' first divergence (where the contexts still agree)")
    traj_reduction: Literal["sum", "mean"] = _f(
        "sum", "L_traj per window: sum = the paper's sum of up to K KLs (lambda scales with K); mean = averaged "
               "over the window's target positions (a per-token KL like L_OPD)")
    position_cost: float = _f(
        0.0, "adds position_cost x |i - j| / K to the OT ground cost, so the plan (and L_traj's targets) prefers "
             "same-position matches; 0 = the paper's order-free cost. Changes D_OT too", ge=0)
    traj_checker: Literal["none", "deque", "deque_alt"] = _f(
        "none", "a task checker that labels the trajectory targets (logs traj/invalid_target_mass)")


@dataclass(frozen=True)
class OTConfig:
    solver: Literal["sinkhorn", "exact"] = _f("sinkhorn", "entropic Sinkhorn (GPU kernel on CUDA) or scipy exact")
    eps: float = _f(0.01, "entropic regularisation relative to each window's cost spread (docs/OT.md)", gt=0)
    max_iter: int = _f(2000, "Sinkhorn iteration cap per epsilon stage", ge=1)
    tol: float = _f(1e-3, "stop when the L1 marginal error is below this (the plan is then rounded onto the marginals)", gt=0)


@dataclass(frozen=True)
class PipelineConfig:
    max_staleness: int = _f(1, "batch k is sampled by exactly weight version k - max_staleness (0 = synchronous); "
                                  "at most queue_size + 1", ge=0)
    queue_size: int = _f(2, "labelled batches produced ahead of the trainer", ge=1)


@dataclass(frozen=True)
class TrainConfig:
    stage: Literal["kd", "opd"] = _f("opd", "kd: stage 1 off-policy KD; opd: stage 2 (mode in topd.mode)")
    deepspeed_config: str = _f("ds_configs/zero3.json", "ZeRO JSON; 'auto' batch keys filled from here", path="file")
    steps: int = _f(100, "optimizer steps", ge=1)
    lr: float = _f(2e-6, "peak learning rate (paper: 2e-6 stage 2, 2e-5 stage 1)", gt=0)
    warmup_ratio: float = _f(0.05, "linear warm-up fraction of steps (paper: 5%)", ge=0, le=1)
    lr_decay: Literal["constant", "linear", "cosine"] = _f("constant", "after warm-up (the paper states only the warm-up)")
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    grad_clip: float = _f(1.0, "gradient clipping norm (paper: 1.0)", ge=0)
    micro_batch_size: int = _f(1, "sequences per rank per forward (paper: 1)", ge=1)
    sequence_parallel_size: int = _f(1, "stage 1: ranks that share one micro-batch's tokens, DeepSpeed-Ulysses "
                                        "(attention heads split after an all-to-all; paper: 2); must divide the "
                                        "rank count and the student's attention heads", ge=1)
    global_batch_size: int = _f(4, "sequences per optimizer step over all ranks (paper: 4 stage 2, 128 stage 1)", ge=1)
    seed: int = _f(0, "seeds python, numpy, torch and sampling")
    sync_every: int = _f(1, "push student weights to its server every N steps", ge=1)
    sync_dir: str = _f("auto", "where synced weights are written for update_weights_from_disk (absolute; the "
                               "server must read it): auto = /dev/shm when it has room and every student server "
                               "is on this machine, else <run_dir>/sync")
    weight_sync: Literal["disk", "tensor", "distributed"] = _f(
        "disk", "how synced weights reach the student server(s) (docs/ENGINES.md \"Weight sync routes\"): disk = "
                "update_weights_from_disk via train.sync_dir, works everywhere; tensor = update_weights_from_tensor, "
                "a handle to /dev/shm (room for two versions), every student server on this machine, dp 1; "
                "distributed = update_weights_from_distributed, a torch.distributed broadcast from rank 0 to the "
                "servers, dp 1, the same NCCL version on both sides. The in-memory routes are opt-in: no GPU run "
                "has confirmed them yet")
    weight_sync_master: str = _f("auto", "weight_sync=distributed: HOST:PORT the student servers reach the trainer's "
                                         "rank 0 at (it listens there); auto = 127.0.0.1 and a free port, only when "
                                         "every student server is on this machine")
    weight_sync_backend: Literal["auto", "nccl", "gloo"] = _f("auto", "weight_sync=distributed: auto = nccl when the "
                                                                      "trainer has a GPU, else gloo")
    weight_sync_nccl: str = _f("auto", "weight_sync=distributed over nccl: the NCCL version of the student servers "
                                       "(e.g. 2.30.7); auto = from their SGLang version (weight_sync.SGLANG_NCCL); "
                                       "it must equal the trainer's, checked at start")
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end)", ge=0)
    eval_every: int = _f(0, "evaluate every N steps (0: only at start and end)", ge=0)
    eval_samples: int = _f(200, "eval problems used during training", ge=1)
    eval_n: int = _f(1, "samples per eval problem; pass@1 is their mean (the paper: Pass@1 averaged over 5 runs)", ge=1)
    eval_temperature: float = _f(0.0, "sampling temperature of the eval during training (0: greedy)", ge=0)
    keep_checkpoints: int = _f(2, "complete checkpoints kept on disk", ge=1)
    out_dir: str = _f("runs", "checkpoints, exports and TensorBoard go to out_dir/run_name")
    run_name: str = _f("run", "name of this run (a directory under out_dir)")
    max_nan_steps: int = _f(3, "consecutive non-finite steps before the run stops", ge=1)
    rank0_wait_s: float = _f(7200.0, "how long the other ranks wait for rank 0's work alone (eval, building a batch, "
                             "server start) at a gloo barrier before stopping with a line naming it", gt=0)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student_server: ServerConfig = field(default_factory=ServerConfig)
    teacher_server: ServerConfig = field(default_factory=ServerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    topd: TOPDConfig = field(default_factory=TOPDConfig)
    ot: OTConfig = field(default_factory=OTConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.train.out_dir, self.train.run_name)


# --------------------------------------------------------------------------------------------------
# Building dataclasses from dicts, with one error line per mistake.


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-6` (no dot) as a string: accept what float() reads
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in value.items()):
            raise ConfigError(f"{key}: expected a mapping of names to names, got {value!r}")
        return dict(value)
    if tp is list:
        if isinstance(value, str):  # a single URL is a list of one
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return list(value)
    raise AssertionError(f"unsupported annotation {tp} at {key}")


def _check_range(value, meta: dict, key: str):
    if value is None:
        return
    for op, bound, word in (("ge", None, ">="), ("gt", None, ">"), ("le", None, "<="), ("lt", None, "<")):
        if op not in meta:
            continue
        bound = meta[op]
        ok = {"ge": value >= bound, "gt": value > bound, "le": value <= bound, "lt": value < bound}[op]
        if not ok:
            raise ConfigError(f"{key}: must be {word} {bound}, got {value}")


def _build(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
            _check_range(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def _check_paths(cfg, prefix: str = ""):
    """Every field marked path=file|dir that is set must exist (checked after overrides are applied)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            _check_paths(value, key)
            continue
        kind = f.metadata.get("path")
        if not kind or not value:
            continue
        if kind == "file" and not os.path.isfile(value):
            raise ConfigError(f"{key}: file not found: {value}")
        if kind == "dir" and not os.path.isdir(value):
            raise ConfigError(f"{key}: directory not found: {value}")
        if kind == "any" and not os.path.exists(value):
            raise ConfigError(f"{key}: file not found: {value}")


def _check_semantics(cfg: Config):
    """Cross-field rules that no single field can check."""
    t = cfg.train
    if cfg.train.stage == "opd" and not cfg.data.prompts:
        raise ConfigError("data.prompts: required for train.stage=opd")
    if not cfg.model.student:
        raise ConfigError("model.student: required")
    if not cfg.model.teacher:
        raise ConfigError("model.teacher: required")
    name = t.run_name
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        # outputs go to out_dir/run_name and nowhere else: a run name cannot climb out of out_dir
        raise ConfigError(f"train.run_name: must be a plain directory name (no '/', not '.' or '..'), got {name!r}")
    if t.stage == "opd":
        per_step = cfg.rollout.prompts_per_step * cfg.rollout.n_per_prompt
        if per_step != t.global_batch_size:
            raise ConfigError(
                f"train.global_batch_size: must equal rollout.prompts_per_step * rollout.n_per_prompt "
                f"= {per_step} (one optimizer step per batch of rollouts), got {t.global_batch_size}")
    if t.sequence_parallel_size > 1 and t.stage != "kd":
        raise ConfigError(f"train.sequence_parallel_size: {t.sequence_parallel_size} > 1 is built for stage 1 only "
                          f"(train.stage=kd), got train.stage={t.stage}")
    if cfg.teacher.scoring == "local" and not (cfg.kd.kd_ratio > 0 if t.stage == "kd" else cfg.opd.estimator == "full"):
        # the local teacher computes the full distribution only; loading it for no loss is a 61 GB mistake
        need = "kd.kd_ratio > 0" if t.stage == "kd" else "opd.estimator: full"
        raise ConfigError(f"teacher.scoring: local runs the teacher on the training ranks for the full-vocabulary "
                          f"losses, which this config does not use (needs {need}); set teacher.scoring: server")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size: must be a multiple of train.micro_batch_size "
                          f"({t.micro_batch_size}), got {t.global_batch_size}")
    if cfg.topd.false_alarm == "low_loss_range" and cfg.topd.low_loss_probes == 0:
        raise ConfigError("topd.low_loss_probes: must be >= 1 when topd.false_alarm=low_loss_range")
    if cfg.data.fields:
        from topd_ds.data.fields import check_mapping
        check_mapping(cfg.data.fields)
    if cfg.data.rows:
        from topd_ds.data.prompts import parse_rows
        try:
            parse_rows(cfg.data.rows, 0)
        except TopdError as err:
            raise ConfigError(str(err)) from None
    if cfg.pipeline.max_staleness > cfg.pipeline.queue_size + 1:
        # the sync of version v waits for batch v - 1 + max_staleness, which the producer only builds when the
        # queue has room: a larger lag would wait for a batch that never starts
        raise ConfigError(f"pipeline.max_staleness: {cfg.pipeline.max_staleness} > pipeline.queue_size + 1 = "
                          f"{cfg.pipeline.queue_size + 1}; raise pipeline.queue_size or lower the staleness")
    if t.weight_sync != "disk" or t.weight_sync_master != "auto" or t.weight_sync_backend != "auto":
        from topd_ds.comm.weight_sync import check_route
        check_route(cfg)
    if cfg.student_server.router and len(cfg.student_server.urls) != 1:
        raise ConfigError("student_server.urls: router=true takes exactly one URL")
    if cfg.teacher_server.router and len(cfg.teacher_server.urls) != 1:
        raise ConfigError("teacher_server.urls: router=true takes exactly one URL")


def _parse_override(text: str):
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def _apply_override(data: dict, path: list, value):
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _resolve_relative(data: dict, base_dir: str):
    """Relative paths in a YAML file are relative to the current directory, except when they do not exist
    there but do exist beside the YAML file (so `configs/x.yaml` can name `../ds_configs/zero3.json`)."""
    for section, keys in (("model", ("student", "teacher")), ("data", ("prompts", "eval", "chat_template")),
                          ("train", ("deepspeed_config",))):
        node = data.get(section)
        if not isinstance(node, dict):
            continue
        for k in keys:
            v = node.get(k)
            if isinstance(v, str) and v and not os.path.isabs(v) and not os.path.exists(v):
                beside = os.path.normpath(os.path.join(base_dir, v))
                if os.path.exists(beside):
                    node[k] = beside


def config_from_dict(data: dict, *, check_paths: bool = True) -> Config:
    cfg = _build(Config, data, "")
    if check_paths:
        _check_paths(cfg)
    _check_semantics(cfg)
    if check_paths:   # the models' config.json are there: new tokens past their positions fail every request
        from topd_ds.shapes import config_length_problems
        problems = config_length_problems(cfg)
        if problems:
            raise ConfigError(problems[0])
    return cfg


def load_config(path: Optional[str], overrides: list = ()) -> Config:
    """Read YAML at `path` (None: defaults only), apply `key.path=value` overrides, validate."""
    data = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _resolve_relative(data, os.path.dirname(os.path.abspath(path)))
    for text in overrides:
        key_path, value = _parse_override(text)
        _apply_override(data, key_path, value)
    return config_from_dict(data)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def describe_config(cls=Config, prefix: str = "") -> list:
    """(key, type, default, doc) rows for every field: the reference table in docs/CONFIG.md."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_config(hints[f.name], key)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, _type_name(hints[f.name]), default, f.metadata.get("doc", "")))
    return rows


# --------------------------------------------------------------------------------------------------
# The ZeRO JSON: filled from the YAML, never contradicting it.

ZERO_STAGES = (0, 1, 2, 3)


def warmup_steps(t: TrainConfig) -> int:
    """Warm-up length in optimizer steps: round(warmup_ratio * steps), at least 1 when the ratio is > 0."""
    return max(1, round(t.warmup_ratio * t.steps)) if t.warmup_ratio > 0 else 0


def lr_factor(step: int, t: TrainConfig) -> float:
    """Multiplier of train.lr for optimizer step `step` (0-based): linear warm-up from lr/warmup to lr
    (no step is wasted at lr 0), then constant, linear decay to 0, or cosine decay to 0."""
    import math

    warm = warmup_steps(t)
    if step < warm:
        return (step + 1) / warm
    if t.lr_decay == "constant" or t.steps <= warm:
        return 1.0
    progress = (step - warm) / (t.steps - warm)
    if t.lr_decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def load_deepspeed_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"train.deepspeed_config: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ConfigError(f"{path}: zero_optimization.stage: must be one of 0, 1, 2, 3, got {stage!r}")
    return ds


def _fill(ds: dict, path: str, key: str, value, source: str):
    """Set ds[key] = value where it is 'auto' or absent; an explicit different value is a contradiction."""
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(f"{path}: {key} = {current!r} contradicts {source} = {value!r} "
                          f"(set it to \"auto\" or make them agree)")


def batch_split_error(global_batch: int, micro: int, world_size: int, *, stage2: bool) -> str:
    """The error line for ranks x micro-batch x accumulation != global batch, with the ways out."""
    fits = [n for n in range(1, global_batch // micro + 1) if global_batch % (n * micro) == 0]
    per_step = micro * world_size
    bigger = -(-global_batch // per_step) * per_step  # the next multiple of per_step
    how = " (stage 2: with rollout.prompts_per_step * rollout.n_per_prompt equal to it)" if stage2 else ""
    micros = ([m for m in range(1, global_batch // world_size + 1) if (global_batch // world_size) % m == 0]
              if global_batch % world_size == 0 else [])
    smaller = f", or train.micro_batch_size in {micros}" if micros else ""
    return (f"train.global_batch_size: {global_batch} does not split over {world_size} rank(s) x "
            f"train.micro_batch_size {micro} x gradient accumulation (ranks x micro-batch x accumulation must "
            f"equal the global batch); launch a rank count in {fits} (TRAIN_GPUS / deepspeed --include, see "
            f"docs/DEEPSPEED.md){smaller}, or set train.global_batch_size to a multiple of {per_step}, "
            f"e.g. {bigger}{how}")


def resolve_deepspeed_config(cfg: Config, *, world_size: int = 1, on_gpu: bool = False) -> dict:
    """The ZeRO JSON named by train.deepspeed_config with 'auto' batch, clip, lr and precision keys filled."""
    t = cfg.train
    path = t.deepspeed_config
    ds = load_deepspeed_json(path)
    sp = t.sequence_parallel_size
    if world_size % sp:
        raise ConfigError(f"train.sequence_parallel_size: {sp} does not divide the {world_size} rank(s) launched")
    # the ranks of a sequence-parallel group share one micro-batch: the data-parallel size is world / sp
    per_rank_step = t.micro_batch_size * (world_size // sp)
    if t.global_batch_size % per_rank_step:
        raise ConfigError(batch_split_error(t.global_batch_size, t.micro_batch_size, world_size // sp,
                                            stage2=cfg.train.stage == "opd"))
    _fill(ds, path, "train_batch_size", t.global_batch_size, "train.global_batch_size")
    _fill(ds, path, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size")
    _fill(ds, path, "gradient_accumulation_steps", t.global_batch_size // per_rank_step,
          "train.global_batch_size / (micro_batch_size * world_size / sequence_parallel_size)")
    if sp > 1:  # DeepSpeed's config then counts world / sp data-parallel ranks (also under zero.Init)
        _fill(ds, path, "sequence_parallel_size", sp, "train.sequence_parallel_size")
        from topd_ds.loss.sequence_parallel import loss_scale

        loss_scale(ds, sp, path=path)  # the ZeRO settings it cannot work with: one line now
    _fill(ds, path, "gradient_clipping", t.grad_clip, "train.grad_clip")
    use_bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and on_gpu)
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = use_bf16
    elif bf16["enabled"] != use_bf16 and cfg.model.dtype != "auto":
        raise ConfigError(f"{path}: bf16.enabled = {bf16['enabled']} contradicts model.dtype = {cfg.model.dtype}")
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{path}: fp16.enabled: fp16 is not supported (use bf16)")
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, path, "lr", t.lr, "train.lr")
        _fill(params, path, "weight_decay", t.weight_decay, "train.weight_decay")
    sched = ds.get("scheduler")
    if sched is not None:  # the user chose a DeepSpeed scheduler: fill its "auto" keys, else the trainer's is used
        params = sched.setdefault("params", {})
        for key, value in (("warmup_max_lr", t.lr), ("warmup_num_steps", warmup_steps(t)),
                           ("total_num_steps", t.steps), ("warmup_min_lr", 0.0)):
            if key in params:
                _fill(params, path, key, value, f"train.steps/lr/warmup_ratio ({key})")
    zero = ds.get("zero_optimization", {})
    for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "reduce_bucket_size"):
        if zero.get(key) == "auto":
            raise ConfigError(f"{path}: zero_optimization.{key}: 'auto' needs the model's hidden size; "
                              f"set a number (see docs/DEEPSPEED.md)")
    return ds
