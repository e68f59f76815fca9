"""The trainer: stage 1 (off-policy KD) or stage 2 (OPD / TOPD) on a DeepSpeed engine, one visible loop.

    topd-ds train --config configs/demo/topd.yaml [key.path=value ...] [--resume auto]
    TRAIN_GPUS=4,5,6,7 scripts/train_single_node.sh configs/qwen3_30b_a3b_to_4b/topd.yaml
        (= deepspeed --include localhost:4,5,6,7 --module topd_ds.train --config ...; docs/DEEPSPEED.md)
    torchrun --nproc_per_node 2 -m topd_ds.train --config ...

Rank 0 talks to the inference servers (launching built-in ones when the config names no URL), runs the
pipeline that builds labelled batches ahead of time, and sends each rank its own sequences as tensors
(transport.py; the other ranks wait for it on a CPU group with its own timeout); every rank trains on them.
The loop: once-in-a-while blocks first (eval, checkpoint; the last step's happen inside the loop),
then one optimizer step with `engine.backward(loss); engine.step()` in plain sight, then weight sync and
logging. The loop state is a dict saved with every checkpoint, so `--resume auto` continues exactly.
Server faults (docs/RELIABILITY.md section 2): every server call of rank 0 (batch builds, weight syncs,
evals) goes through `engines.supervisor`, which restarts a built-in server with the current weights and
has the work redone; past server.max_restarts failures in a row rank 0 sends a "stop" header
instead of a batch, every rank saves a checkpoint of the current step, and the run stops with one line.
"""

import argparse
import os
import random
import signal
import sys
import time

import numpy as np
import torch

from topd_ds import checkpoint, procstat
from topd_ds.comm import distributed as ds
from topd_ds.comm.batch_scatter import share_batch
from topd_ds.comm.distributed import print0
from topd_ds.comm.transport import Transport
from topd_ds.comm.weight_sync import (WeightSync, check_route_servers, check_shm_room, model_bytes, resolve_route,
                                      sync_root, training_dtype)
from topd_ds.config import config_to_dict, load_config, lr_factor, resolve_deepspeed_config
from topd_ds.data.tokenizers import load_tokenizers
from topd_ds.engines.startup import make_clients_factory, start_servers
from topd_ds.engines.supervisor import ServerFailure, Supervisor
from topd_ds.errors import ConfigError, DataError, TopdError
from topd_ds.interrupt import Interrupted, StopRequest
from topd_ds.loss import traj_targets
from topd_ds.teacher.tables import load_teacher_tables


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="topd-ds train", description="OPD / TOPD distillation on DeepSpeed")
    ap.add_argument("--config", required=True, help="YAML config (see docs/CONFIG.md)")
    ap.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a checkpoint dir")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. topd.window=20")
    return ap.parse_args(argv)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def call_recovering(pipeline, supervisor, make_coro):
    """pipeline.call(make_coro()), redone from scratch after each ServerError the supervisor recovers from
    (a restarted server, a user-given one back); ServerFailure past server.max_restarts."""
    return pipeline.call(supervisor.retry(make_coro))[0]


def micro_batches(n_sequences: int, micro: int):
    """Indices into this rank's local batch (its sequences r, r + W, ... of the step, batch_scatter),
    split into micro-batches of `micro`."""
    return [list(range(i, min(i + micro, n_sequences))) for i in range(0, n_sequences, micro)]


def check_equal_share(n_local: int, global_batch: int, *, rank: int, world: int):
    """Every rank must run the same number of micro-batches: each is a forward and a backward (under ZeRO-3,
    the all-gathers of every layer) and an engine.step (the accumulation boundary). A rank whose share of the
    step is not global_batch / world stops with one line (and the launcher stops the others) instead of
    leaving its peers in a gather."""
    if n_local * world != global_batch:
        raise TopdError(f"rank {rank}: {n_local} sequences this step, {global_batch // world} expected "
                        f"(train.global_batch_size {global_batch} / {world} ranks); every rank must run the same "
                        f"forwards and backwards")


def evaluate(pipeline, supervisor, examples, tokenizer, cfg) -> dict:
    """Pass@1 of the student server on up to train.eval_samples problems (rank 0): greedy, or the mean of
    train.eval_n samples at train.eval_temperature, with the same eval seed at every step so that evals of
    one run (and of runs from the same warm start) differ by their weights only. Redone whole after a server
    fault the supervisor recovers from."""
    from topd_ds.evaluate import answers_of, pass_at_1

    examples = examples[:cfg.train.eval_samples]
    return call_recovering(pipeline, supervisor, lambda: pass_at_1(
        pipeline.student, [e.prompt_ids for e in examples], answers_of(examples),
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True), n=cfg.train.eval_n,
        temperature=cfg.train.eval_temperature, max_new_tokens=cfg.rollout.max_new_tokens,
        eos_id=tokenizer.eos_token_id))


def log_batch_histograms(writer, batch, step):
    d_ot = getattr(batch, "candidate_d_ot", None)  # stage-1 batches have no probes
    if d_ot is None or d_ot.numel() == 0:
        return
    writer.add_histogram("ot/d_ot_candidates", batch.candidate_d_ot, step)
    fa = batch.candidate_false_alarm
    if fa is not None and bool(fa.any()):
        writer.add_histogram("ot/d_ot_false_alarm", batch.candidate_d_ot[fa], step)
    if fa is not None and bool((~fa).any()):
        writer.add_histogram("ot/d_ot_real", batch.candidate_d_ot[~fa], step)


def check_teacher_responses(cfg, n_prompts: int, args):
    """Stage 1 reads the teacher's responses that `topd-ds sample` wrote (sampling inside the job would keep
    every other rank waiting in a collective for hours): every rank counts the file's lines, so a missing or
    incomplete file stops them all with one line naming the command, before any model is loaded."""
    from topd_ds.stage1.sample import count_lines, responses_missing, responses_path

    path, need = responses_path(cfg), cfg.kd.n_samples or n_prompts
    have = count_lines(path)
    if have < need:
        command = " ".join([args.config] + [o if " " not in o else repr(o) for o in args.overrides])
        raise ConfigError(responses_missing(path, have, need, command))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM (a scheduler's cancel, `kill`) unwinds like Ctrl-C, so the servers we launched are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cfg = load_config(args.config, args.overrides)  # every config error surfaces here, before any work
    from topd_ds.stage1 import data as stage1_data  # noqa: F401  (import errors surface early too)

    # the batch split is checked against the launcher's WORLD_SIZE before any process group or model exists
    ds_config = resolve_deepspeed_config(cfg, world_size=ds.launched_world_size(), on_gpu=torch.cuda.is_available())
    from topd_ds.loss.sequence_parallel import check as check_sequence_parallel

    check_sequence_parallel(cfg.model.student, cfg.train.sequence_parallel_size, ds.launched_world_size())
    check_route_servers(cfg)  # in-memory weight routes: the running student servers' dp size and NCCL version
    ds.init_distributed(cfg.train.rank0_wait_s)
    assert ds.world_size() == ds.launched_world_size(), "torch.distributed disagrees with the launcher's WORLD_SIZE"
    tokenizer = load_tokenizers(cfg)
    from topd_ds.data import open_prompt_set

    # indexed, checked up to data.check_rows now, tokenised when drawn (docs/DATA.md); errors before any work
    prompts = open_prompt_set(cfg.data.prompts, tokenizer, cfg.data,
                              require_response=cfg.train.stage == "kd" and cfg.kd.source == "dataset")
    eval_set = open_prompt_set(cfg.data.eval, tokenizer, cfg.data, eval_set=True) if cfg.data.eval else None
    eval_examples = list(eval_set) if eval_set is not None else []
    for line in [prompts.summary()] + ([eval_set.summary()] if eval_set is not None else []):
        print0(f"data: {line}")
    if cfg.train.stage == "kd" and cfg.kd.source == "teacher":
        check_teacher_responses(cfg, len(prompts), args)
    resume_dir = checkpoint.find_resume(cfg.run_dir, args.resume)
    os.makedirs(cfg.run_dir, exist_ok=True)
    seed_everything(cfg.train.seed)
    print0(f"topd-ds train: stage={cfg.train.stage} mode={cfg.topd.mode} world={ds.world_size()} "
           f"run_dir={cfg.run_dir}" + (f" resume={resume_dir}" if resume_dir else ""))
    if ds.rank() == 0:
        for junk in checkpoint.remove_stale(cfg.run_dir):  # half-written by a killed run; never resumed from
            print0(f"removed {junk}")
        checkpoint.write_json_atomic(os.path.join(cfg.run_dir, "config.json"), config_to_dict(cfg))

    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    engine = ds.build_engine(cfg.model.student, ds_config, gradient_checkpointing=cfg.model.gradient_checkpointing,
                             lr_lambda=lambda step: lr_factor(step, cfg.train),
                             sequence_parallel_size=cfg.train.sequence_parallel_size)
    from topd_ds.teacher.local import needs_local

    # teacher.scoring local: the teacher on every rank, ZeRO-3 partitioned, no optimizer (topd_ds/teacher/local.py)
    teacher = ds.build_teacher_engine(cfg.model.teacher, ds_config) if needs_local(cfg) else None
    check_shm_room(cfg.train.weight_sync, engine, training_dtype(engine))  # tensor route: before any server starts
    state = {"step": 0, "nan_steps": 0, "total_nan_steps": 0}
    if resume_dir:
        state = checkpoint.load(engine, resume_dir)
        print0(f"resumed from {resume_dir} at step {state['step']}")
    teacher_head, embedding = load_teacher_tables(cfg)
    supervisor = Supervisor(cfg.run_dir if ds.rank() == 0 else None)
    try:
        code = _run(cfg, engine, state, tokenizer, prompts, eval_examples, teacher_head, embedding, supervisor,
                    resumed=bool(resume_dir), teacher=teacher)
        ds.leave_at_exit()  # a finished run's process groups are destroyed at exit (gloo can abort otherwise)
        return code
    finally:
        supervisor.stop_all()


def _run(cfg, engine, state, tokenizer, prompts, eval_examples, teacher_head, embedding, supervisor, *, resumed,
         teacher=None):
    """The loop. Each step: eval/checkpoint when due, the next batch (rollouts and labels, built ahead by the
    pipeline), the loss and optimizer step, the weight sync, the log line. Loop state lives in `state`."""
    from tqdm import tqdm

    rank0 = ds.rank() == 0
    pipeline = writer = None
    if rank0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(cfg.run_dir, "tb"))
        pipeline = start_pipeline(cfg, state, prompts, tokenizer, teacher_head, embedding, supervisor,
                                  resumed=resumed)
    stage1_data = None
    if cfg.train.stage == "kd":
        from topd_ds.stage1.data import Stage1Data

        stage1_data = Stage1Data.prepare(cfg, prompts, pipeline) if rank0 else None
    dtype = training_dtype(engine)
    root = sync_root(cfg.train.sync_dir, cfg.run_dir, cfg.student_server.urls, model_bytes=model_bytes(engine, dtype))
    sync = WeightSync(engine, pipeline, tokenizer, root, supervisor, dtype=dtype, **resolve_route(cfg))
    # the teacher lm_head on the training device once, not copied per micro-batch (1.2 GB at the paper's shape);
    # only where a loss reads it (full-vocabulary OPD, stage 1's KD term)
    needs_head = cfg.train.stage == "kd" or cfg.opd.estimator == "full"
    loss_head = teacher_head.to(engine.device) if needs_head else teacher_head
    tp = Transport()  # every rank: each step's sequences go to their rank as tensors (docs/TRAINING.md)
    ds.wait_for_rank0("starting the servers and reading the data")
    failure = None  # rank 0: a ServerFailure; sent instead of the next batch, then every rank stops
    if rank0:
        pipeline.start()
    bar = tqdm(total=cfg.train.steps, initial=state["step"], disable=not rank0, dynamic_ncols=True)
    # Ctrl-C / SIGTERM from here on: leave at the next step boundary (topd_ds/interrupt.py)
    stop = StopRequest().install()
    try:
        while True:
            step = state["step"]
            last_step = step == cfg.train.steps
            # -- once in a while: eval and checkpoint (the last step's too) ------------------------------------
            eval_due = bool(eval_examples) and (last_step or step == 0 or
                                                (cfg.train.eval_every and step % cfg.train.eval_every == 0))
            if rank0 and eval_due:
                failure = eval_and_log(pipeline, supervisor, sync, eval_examples, tokenizer, cfg, writer, state,
                                       failure)
            if eval_due:  # the others wait for rank 0's eval here, with a named timeout, not in the next collective
                ds.wait_for_rank0(f"evaluating step {step}")
            saved = None
            if step > 0 and (last_step or (cfg.train.save_every and step % cfg.train.save_every == 0)):
                saved = checkpoint.save(engine, cfg.run_dir, state, tokenizer, keep=cfg.train.keep_checkpoints)
                print0(f"\ncheckpoint {saved}")
            if last_step:
                stop.restore()  # a signal from here on acts at once
                break
            # -- one step: batch (rollouts + labels), loss and optimizer step, weight sync, log -----------------
            # the step's clock starts here: time/step_s excludes start-up, evals and checkpoints, so summed
            # step times are the training cost that rows are matched on (issue 25)
            t_step = time.perf_counter()
            batch, local = next_batch(pipeline, stage1_data, sync, failure, cfg, step, tp, dtype, stop)
            if local is None:
                stop_early(batch, engine, cfg, state, tokenizer, saved, stop)
            terms, train_s = optimizer_step(engine, local, cfg, loss_head, tokenizer, step, teacher=teacher)
            grad_norm = count_nonfinite_step(engine, terms, state, cfg, tokenizer, step)
            state["step"] = step + 1
            sync_s = 0.0
            if state["step"] % cfg.train.sync_every == 0 or state["step"] == cfg.train.steps:
                sync_s = sync.push(state["step"])
            if rank0:
                dt = time.perf_counter() - t_step
                log_step(writer, bar, tokenizer, state, batch, terms, engine, grad_norm,
                         {"time/train_s": train_s, "time/sync_s": sync_s, "time/step_s": dt,
                          **(sync.stats if sync_s else {}),
                          # the share of L_traj's target mass the task's checker calls invalid (issue 25)
                          **traj_targets.check_batch_targets(batch, tokenizer, checker=cfg.topd.traj_checker,
                                                             targets=cfg.topd.traj_targets)}, step,
                         packs_windows=cfg.topd.mode == "topd" and cfg.topd.lam != 0)
                writer.add_scalar("data/long_prompts_skipped", prompts.n_long, state["step"])
        bar.close()
        if rank0:
            print0(f"data: {prompts.summary()}")
            finish(sync, failure, cfg, state)
        return 0
    finally:
        stop.restore()  # a Ctrl-C during the clean-up acts at once
        bar.close()  # before the error or Ctrl-C line, not after it at exit
        if pipeline is not None:
            pipeline.close()
        sync.close()
        if writer is not None:  # last: after an interrupt the second signal raised wherever, this can wait (see
            writer.close()      # interrupt.py), and the rest must not wait behind it


def ot_table(cfg, embedding):
    """The OT ground cost's table on the trainer's device when the run solves OT (TOPD-family modes), so costs and
    Sinkhorn run there, the fused kernel on CUDA (V D 4 bytes on rank 0's device); else the table as loaded."""
    from topd_ds.ot import cost_table
    from topd_ds.rollout.pipeline import PROBING_MODES

    if cfg.train.stage == "opd" and cfg.topd.mode in PROBING_MODES:
        return cost_table(embedding, ds.device())
    return embedding


def start_pipeline(cfg, state, prompts, tokenizer, teacher_head, embedding, supervisor, *, resumed):
    """Rank 0: the servers (started or reached) and the pipeline that builds labelled batches ahead of the loop."""
    from topd_ds.rollout.pipeline import Pipeline
    from topd_ds.tasks.oracle_cut import first_error_cut

    # the student server starts from the weights being trained: the initial model, or a resumed checkpoint's
    student_weights = checkpoint.export_dir(state["_dir"]) if resumed else cfg.model.student
    student_url, teacher_url = start_servers(cfg, student_weights, supervisor,
                                             student_version=str(state["step"]) if resumed else None)
    pipeline = Pipeline(prompts=prompts.prompt_ids,  # drawn and tokenised per step
                        make_clients=make_clients_factory(cfg, student_url, teacher_url,
                                                          teacher_hidden_size=teacher_head.shape[1],
                                                          supervisor=supervisor),
                        teacher_head=teacher_head, embedding=ot_table(cfg, embedding), cfg=cfg,
                        start_step=state["step"], eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                        weight_version=state["step"], produce=cfg.train.stage == "opd", supervisor=supervisor,
                        score_device=ds.device(),  # selection scores on rank 0's training device
                        cut_rollout=first_error_cut(cfg.opd.cut_after_first_error, tokenizer))
    # only `teacher.scoring: server` asks the teacher server for hidden states (stage 2's full estimator, stage 1's
    # KD term); with `local` the trainer's ranks compute them and the server needs no such flag
    full_stage2 = cfg.train.stage == "opd" and cfg.opd.estimator == "full"
    if cfg.teacher.scoring == "server" and (full_stage2 or (cfg.train.stage == "kd" and cfg.kd.kd_ratio > 0)):
        # SGLang refuses return_hidden_states without this launch flag: say so now, not at the first batch
        missing = pipeline.call(pipeline.teacher.missing_flags(hidden_states=True))
        if missing:
            pipeline.close()
            raise ConfigError(f"teacher_server.urls: restart the teacher with {'; '.join(missing)}, "
                              f"or set teacher.scoring: local" + (" (or opd.estimator: topk)" if full_stage2 else ""))
    if cfg.student_server.urls:
        # a server we did not start holds whatever it last loaded (e.g. a killed run's newest sync, which is
        # ahead of the checkpoint resumed from): load the weights this run starts from
        print0(f"loading {student_weights} into the student server(s) {', '.join(cfg.student_server.urls)}")
        supervisor.set_weights("student", student_weights, str(state["step"]))  # what it reloads if it comes back
        call_recovering(pipeline, supervisor,
                        lambda: pipeline.student.update_weights(student_weights, str(state["step"])))
    return pipeline


def eval_and_log(pipeline, supervisor, sync, eval_examples, tokenizer, cfg, writer, state, failure):
    """Rank 0: pass@1 of the weights of this step, logged and kept in state["eval"]; returns the
    ServerFailure that stops the run, if any (the earlier one, a failed sync's, or the eval's)."""
    t0 = time.perf_counter()
    step = state["step"]
    sync.wait()  # evaluate the weights of this step, not the previous sync's
    failure = failure or sync.failure
    if failure:
        return failure
    try:
        result = evaluate(pipeline, supervisor, eval_examples, tokenizer, cfg)
    except ServerFailure as err:
        return err
    writer.add_scalar("eval/pass@1", result["pass@1"], step)
    writer.add_text("eval/sample", "\n\n".join(result["samples"][:4]), step)
    state.setdefault("eval", {})[str(step)] = result["pass@1"]
    print0(f"\nstep {step}: eval pass@1 {100 * result['pass@1']:.1f}% "
           f"({result['n_problems']} problems, {time.perf_counter() - t0:.1f}s)")
    return None


def next_batch(pipeline, stage1_data, sync, failure, cfg, step, tp, hidden_dtype, stop):
    """(batch, local): rank 0 builds or takes the batch of `step` (kept whole there for the logs; None
    elsewhere) and every rank receives its own sequences as tensors (`local`, batch_scatter.share_batch).
    After a ServerFailure on rank 0 (or the DataError of a bad row first read now, past data.check_rows), or
    a stop request there (Ctrl-C, SIGTERM: `stop`), local is None on every rank and batch is the reason
    (rank 0), so that every rank leaves the loop at the same step."""
    batch = None
    if ds.rank() == 0:
        failure = failure or sync.failure
        try:
            if not failure and not stop():
                batch = pipeline.get(give_up=stop) if cfg.train.stage == "opd" else stage1_data.batch(step)
        except (ServerFailure, DataError) as err:
            failure = err
        if stop():  # the reason, also when servers failed with it (the launcher's SIGTERM reaches them too)
            failure, batch = Interrupted(stop.signum), None
    local = share_batch(tp, None if failure else batch, step=step, hidden_dtype=hidden_dtype,
                        sp=cfg.train.sequence_parallel_size)
    return (failure if local is None else batch), local


def stop_early(reason, engine, cfg, state, tokenizer, saved, stop):
    """Every rank, after rank 0 sent no batch (`reason` there: a server failure or Interrupted): save the weights
    of this step (unless just saved), so --resume auto goes on here; stop."""
    saved = saved or checkpoint.save(engine, cfg.run_dir, state, tokenizer, keep=cfg.train.keep_checkpoints)
    ds.leave_at_exit()  # every rank is past its last collective
    if ds.rank() != 0:  # rank 0 says why, once; a rank that was signalled too exits as the signal asks
        raise Interrupted(stop.signum) if stop.signum else SystemExit(1)
    where = f"stopped at step {state['step']}, checkpoint saved: {saved} (continue with --resume auto)"
    if isinstance(reason, Interrupted):
        print(f"\n{where}", file=sys.stderr, flush=True)  # above the one line the cli prints for it
        raise reason
    raise TopdError(f"{reason}; {where}")


def optimizer_step(engine, batch, cfg, teacher_head, tokenizer, step, *, teacher=None):
    """Forward, backward and engine.step() over this rank's micro-batches; (terms per micro-batch, seconds).
    `teacher`: the local teacher engine (teacher.scoring local), run inside each micro-batch's loss."""
    from topd_ds.loss.objective import stage2_loss
    from topd_ds.stage1.data import stage1_step_loss

    loss_of = stage2_loss if cfg.train.stage == "opd" else stage1_step_loss
    t0 = time.perf_counter()  # train_s: forward, backward and optimizer only (wait_s is the pipeline's)
    terms = {}
    engine.train()
    # the ranks of a Ulysses group share their sequences: world / sp data-parallel streams
    check_equal_share(len(batch.sequences), cfg.train.global_batch_size, rank=ds.rank(),
                      world=ds.world_size() // cfg.train.sequence_parallel_size)
    for idx in micro_batches(len(batch.sequences), cfg.train.micro_batch_size):
        loss, t = loss_of(engine, batch, idx, cfg=cfg, teacher_head=teacher_head, pad_id=tokenizer.pad_token_id,
                          device=engine.device, teacher=teacher)
        if not torch.isfinite(loss):
            # Skip the whole optimizer step, on every rank: a zero loss would still let AdamW move the
            # weights (momentum, weight decay). Instead the gradients are made NaN on purpose; ZeRO's
            # step (stages 1-3) sees a non-finite global grad norm (all-reduced, so every rank agrees),
            # zeroes the gradients and skips the update and the lr scheduler, as for an fp16 overflow.
            if not engine.zero_optimization():
                raise TopdError(f"non-finite loss at step {step + 1}: ZeRO stage 0 cannot skip a step "
                                f"(use zero_optimization.stage >= 1); weights not updated")
            loss = loss * float("nan")
            t["nonfinite"] = 1
        engine.backward(loss)
        engine.step()
        for k, v in t.items():
            terms.setdefault(k, []).append(v)
    return terms, time.perf_counter() - t0


def count_nonfinite_step(engine, terms, state, cfg, tokenizer, step):
    """The step's global grad norm; counts a skipped (non-finite) step in `state` and stops, with a
    checkpoint of the unchanged weights, after train.max_nan_steps in a row."""
    grad_norm = engine.get_global_grad_norm()
    skipped = bool(terms.pop("nonfinite", None)) or (grad_norm is not None and not np.isfinite(float(grad_norm)))
    state["nan_steps"] = state["nan_steps"] + 1 if skipped else 0
    state["total_nan_steps"] += int(skipped)
    if state["nan_steps"] >= cfg.train.max_nan_steps:
        # skipped steps left the weights as they were: save them, so the run can resume from here
        checkpoint.save(engine, cfg.run_dir, {**state, "nan_steps": 0}, tokenizer, keep=cfg.train.keep_checkpoints)
        raise TopdError(f"{state['nan_steps']} consecutive non-finite losses/gradients at step {step + 1}; "
                        f"stopping (train.max_nan_steps={cfg.train.max_nan_steps}); "
                        f"checkpoint of step {step} saved")
    return grad_norm


def log_step(writer, bar, tokenizer, state, batch, terms, engine, grad_norm, times, step, *, packs_windows=False):
    """Rank 0: the step's scalars to TensorBoard, state["history"] and the progress bar."""
    scalars = {k: float(np.mean(v)) for k, v in terms.items()}
    n_tokens = sum(len(s) - p for s, p in zip(batch.sequences, batch.prompt_lens))
    scalars.update({"train/lr": engine.get_lr()[0], "train/grad_norm": float(grad_norm or 0.0),
                    "train/tokens_per_s": n_tokens / max(times["time/step_s"], 1e-9), **times,
                    "train/nan_steps": state["total_nan_steps"],
                    "pipeline/staleness": step - batch.weight_version, "mem/peak_rss_mb": _peak_rss_mb()})
    scalars.update(procstat.usage())  # rss now, threads, launched servers: a leak shows as a slope
    # machine-independent cost (issue 25): tokens sampled by the servers (rollouts, probes) and tokens through the
    # student's forward and backward (rollouts plus the TOPD windows packed behind them, each without its last
    # token: packing.pack)
    windows = getattr(batch, "windows", None) if packs_windows else None
    n_window = 0 if windows is None else int((windows.student_mask.sum(-1) - 1).clamp_min(0).sum())
    scalars["cost/tokens_trained"] = float(sum(len(s) for s in batch.sequences) + n_window)
    for k, v in batch.stats.items():
        prefix = "cost" if k.startswith("tokens_") else "time" if k.endswith("_s") else "pipeline"
        scalars[f"{prefix}/{k}"] = float(v)
    if torch.cuda.is_available():
        scalars["mem/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    for k, v in scalars.items():
        writer.add_scalar(k, v, state["step"])
    log_batch_histograms(writer, batch, state["step"])
    if state["step"] % 10 == 1 and hasattr(batch, "sequences"):
        writer.add_text("rollout/sample", tokenizer.decode(batch.sequences[0], skip_special_tokens=True),
                        state["step"])
    state.setdefault("history", []).append({"step": state["step"], **scalars})
    bar.set_postfix({k.split("/")[-1]: f"{scalars[k]:.4g}" for k in
                     ("loss/total", "loss/kd", "loss/traj", "pipeline/false_alarm_frac") if k in scalars})
    bar.update(1)


def finish(sync, failure, cfg, state):
    """Rank 0, after the last step: wait for the last weight sync, export the student to run_dir/final and
    write summary.json."""
    sync.wait()
    failure = failure or sync.failure
    if failure:  # the final weights could not reach the student server; they are checkpointed
        raise TopdError(f"{failure}; stopped at step {state['step']}, checkpoint saved: "
                        f"{checkpoint.list_checkpoints(cfg.run_dir)[-1]} (continue with --resume auto)")
    final = os.path.join(cfg.run_dir, "final")
    checkpoint.copy_export(cfg.run_dir, state["step"], final)
    checkpoint.write_json_atomic(os.path.join(cfg.run_dir, "summary.json"),
                                 {"steps": state["step"], "eval": state.get("eval", {}),
                                  "history": state.get("history", [])})
    print0(f"done: exported student to {final}; TensorBoard logs in {os.path.join(cfg.run_dir, 'tb')}")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    from topd_ds.cli import main as cli_main

    sys.exit(cli_main(["train"] + sys.argv[1:]))
