"""Where the probing seconds of a TOPD step go, on the built-in servers.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_probing.py --config configs/deque/topd.yaml \
        [--steps 2] [--repeat 3] [--profile] [--compare DIR] [--json out.json] [key.path=value ...]

Starts the student and teacher built-in servers as `topd-ds train` does (one batch per request,
batch_window_ms 0), builds the batches of steps 0..steps-1 with the real Pipeline (rollouts, scoring,
candidates, probing, OT), then times the probing of each batch again `--repeat` times, split into:

    both        teacher and student probes as the pipeline sends them (concurrently)
    teacher     the teacher's probes alone
    student     the student's probes alone

and reports the probe count, prefix tokens (what a prefill from scratch would process) and distinct
rollouts (what one prefill per rollout processes). --profile runs the student's probe rows of the
first batch in-process through HFEngine under cProfile and prints the top functions.

--compare DIR also starts a teacher and a student server from the checkout DIR (another version of this
code, e.g. `git worktree add DIR <commit>`) and times the same probes on both pairs of servers in turn
(this checkout, DIR, this checkout, ...), so a load change on a shared machine hits both alike:
probe_both_s / compare_both_s is the speedup of this checkout over DIR.
"""

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/deque/topd.yaml")
    ap.add_argument("--steps", type=int, default=2, help="batches to build")
    ap.add_argument("--repeat", type=int, default=3, help="timed probing repeats per batch")
    ap.add_argument("--profile", action="store_true", help="cProfile the student's probe rows in-process")
    ap.add_argument("--compare", default=None, help="checkout dir of another version to time in turn")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from topd_ds.rollout import seeds
    from topd_ds.config import load_config
    from topd_ds.data import open_prompt_set
    from topd_ds.engines.launch import launch_server
    from topd_ds.engines.protocol import SamplingParams
    from topd_ds.engines.sglang import SGLangClient
    from topd_ds.rollout.pipeline import Pipeline
    from topd_ds.teacher.tables import load_teacher_tables
    from topd_ds.data.tokenizers import load_tokenizers

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizers(cfg)
    prompts = open_prompt_set(cfg.data.prompts, tokenizer, cfg.data)
    head, emb = load_teacher_tables(cfg)
    k = cfg.topd.window
    out = {"config": args.config, "overrides": args.overrides, "window": k, "batches": [],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pythonpath": os.environ.get("PYTHONPATH")}
    other = args.compare and os.path.abspath(args.compare)
    with contextlib.ExitStack() as stack:
        teacher, student = (stack.enter_context(launch_server(m, batch_window_ms=0)) for m in
                            (cfg.model.teacher, cfg.model.student))
        if other:  # the same model dirs, served by the other checkout's code (its dir first on sys.path)
            o_teacher, o_student = (stack.enter_context(launch_server(os.path.abspath(m), batch_window_ms=0,
                                                                      cwd=other))
                                    for m in (cfg.model.teacher, cfg.model.student))

        async def clients():
            return SGLangClient([student.url]), SGLangClient([teacher.url])

        async def other_clients():
            return SGLangClient([o_student.url]), SGLangClient([o_teacher.url])

        pipe = Pipeline(prompts=prompts.prompt_ids, make_clients=clients, teacher_head=head, embedding=emb, cfg=cfg,
                        start_step=0, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                        weight_version=0, produce=False)
        pairs = {"probe": (pipe.teacher, pipe.student)}
        if other:
            o_student_c, o_teacher_c = pipe.call(other_clients())
            pairs["compare"] = (o_teacher_c, o_student_c)
        try:
            pipe.call(pipe.build(0, 0))  # warm-up: first requests, lazy imports
            for step in range(args.steps):
                batch = pipe.call(pipe.build(step, 0))
                rec = {k_: round(v, 4) for k_, v in batch.stats.items() if k_.endswith("_s")}
                # the probed prefixes, rebuilt as probe_windows does (all candidates, before labelling)
                prefixes, roots = probed_prefixes(pipe, batch)
                rec.update(probes=len(prefixes), prefix_tokens=sum(map(len, prefixes)),
                           rollouts_probed=len(roots), rollout_tokens=sum(len(batch.sequences[b]) for b in roots))
                params = SamplingParams(max_new_tokens=k, temperature=cfg.topd.probe_temperature,
                                        stop_token_ids=(tokenizer.eos_token_id,))
                s_seeds = [r[0] for r in seeds.seed_grid(cfg.train.seed, seeds.PROBE_STUDENT, step, len(prefixes))]
                t_seeds = [r[0] for r in seeds.seed_grid(cfg.train.seed, seeds.PROBE_TEACHER, step, len(prefixes))]
                times = {f"{p}_{n}": [] for p in pairs for n in ("both", "teacher", "student")}
                windows = {}
                for _ in range(args.repeat):
                    for name, (t_client, s_client) in pairs.items():   # in turn: load hits both alike
                        t0 = time.perf_counter()
                        windows[name] = pipe.call(gather(t_client.continue_from(prefixes, k, params, seeds=t_seeds),
                                                         s_client.continue_from(prefixes, k, params, seeds=s_seeds)))
                        times[f"{name}_both"].append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        pipe.call(t_client.continue_from(prefixes, k, params, seeds=t_seeds))
                        times[f"{name}_teacher"].append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        pipe.call(s_client.continue_from(prefixes, k, params, seeds=s_seeds))
                        times[f"{name}_student"].append(time.perf_counter() - t0)
                rec.update({f"{n}_s": round(statistics.median(v), 4) for n, v in times.items()})
                if other:
                    rec["same_windows_as_compare"] = all(
                        [c.output_ids for c in a] == [c.output_ids for c in b]
                        for a, b in zip(windows["probe"], windows["compare"]))
                out["batches"].append(rec)
                print(json.dumps(rec), flush=True)
                if args.profile and step == 0:
                    profile_rows(cfg, prefixes, k, params, s_seeds)
        finally:
            if other:
                pipe.call(gather(o_teacher_c.close(), o_student_c.close()))
            pipe.close()
    keys = [n for n in out["batches"][0] if n.endswith("_s")]
    out["median"] = {n: statistics.median(b.get(n, 0.0) for b in out["batches"]) for n in keys}
    if other:
        for n in ("both", "teacher", "student"):
            out["median"][f"speedup_{n}"] = round(out["median"][f"compare_{n}_s"] / out["median"][f"probe_{n}_s"], 3)
    print(json.dumps(out["median"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


async def gather(*coros):
    return await asyncio.gather(*coros)


def probed_prefixes(pipe, batch):
    """The candidate prefixes the pipeline probed in `batch` (same selection, same order), and the rollouts
    they come from."""
    from topd_ds.rollout import divergence
    from topd_ds.rollout.pipeline import stack_ragged

    cfg = pipe.cfg
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + batch.step)
    scores, mask = stack_ragged(batch.selection_score)
    count = cfg.topd.candidate_count or None
    high = divergence.select_candidates(scores, mask, fraction=None if count else cfg.topd.candidate_fraction,
                                        count=count, mode="high", generator=gen)
    seq_idx, resp_pos = high.nonzero(as_tuple=True)
    prefixes = [batch.sequences[b][:batch.prompt_lens[b] + r] for b, r in zip(seq_idx.tolist(), resp_pos.tolist())]
    return prefixes, sorted(set(seq_idx.tolist()))


def profile_rows(cfg, prefixes, k, params, row_seeds):
    """The student's probe rows through HFEngine.generate in this process, under cProfile."""
    from topd_ds.engines.hf_engine import HFEngine, Row

    engine = HFEngine(cfg.model.student)
    rows = [Row(input_ids=list(p), max_new_tokens=k, temperature=params.temperature,
                stop_token_ids=frozenset(params.stop_token_ids), seed=s, return_logprob=True)
            for p, s in zip(prefixes, row_seeds)]
    engine.generate(rows)  # warm-up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    engine.generate(rows)
    prof.disable()
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
    print(f"in-process HFEngine.generate of {len(rows)} student probe rows: {wall:.3f} s wall (under cProfile)")
    print(buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
