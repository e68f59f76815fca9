"""Soak run (issue 8 promise 7): many pipelined TOPD steps; is memory flat, are threads constant, is the
queue bounded, and are the launched servers gone after exit?

    .venv/bin/python scripts/soak.py                       # 300 steps into runs/soak (about 5-10 min, 2 CPUs)
    .venv/bin/python scripts/soak.py --steps 30 --out /tmp/soak

Builds a tiny teacher and student (random Qwen3, as tests/conftest.py does) and arith prompts, then runs
`topd-ds train` as a child process: TOPD, pipelined (`pipeline.max_staleness: 1`, `queue_size: 2`), built-in
servers, a checkpoint every 50 steps. Every step the trainer logs (topd_ds/procstat.py) its resident memory
`mem/rss_mb`, kernel threads `sys/threads`, Python threads `sys/py_threads`, live children `sys/children`
and their memory `mem/children_rss_mb` (the two servers), and the pipeline's `queue_depth` and staleness;
this script reads them from summary.json. While the child runs it records the pids and command lines of the
child's children from /proc (the launched servers, told apart by command line, and any short-lived helper), and
checks after the exit that none is still alive.

Output: <out>/soak.json (every step's numbers and the verdict), <out>/soak.png (the curves), and a verdict
line: RSS slope over the second half in MB per 100 steps (least squares), the thread counts over the second
half, the largest queue depth against queue_size, and the children left alive after exit.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from topd_ds import procstat

SERVER_MODULE = "topd_ds.engines.server"  # the built-in server's command line names it
RSS_SLOPE_LIMIT_MB = 2.0  # per 100 steps over the second half; a leak of 20 KB per step fails it


def write_config(out: str, teacher: str, student: str, *, steps: int, queue_size: int, max_staleness: int,
                 save_every: int, deepspeed_config: str = os.path.join(REPO, "ds_configs/zero3.json")) -> str:
    from topd_ds.tasks.arith import make_splits, write_jsonl

    prompts = os.path.join(out, "train.jsonl")
    write_jsonl(prompts, make_splits(256, 8, seed=3, depth=2)[0])
    cfg = {"model": {"teacher": teacher, "student": student},
           "data": {"prompts": prompts, "max_prompt_tokens": 64},
           "rollout": {"n_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 12},
           "topd": {"mode": "topd", "window": 6, "candidate_fraction": 0.25},
           "pipeline": {"max_staleness": max_staleness, "queue_size": queue_size},
           "train": {"stage": "opd", "deepspeed_config": deepspeed_config,
                     "steps": steps, "save_every": save_every, "lr": 1e-3, "global_batch_size": 4,
                     "micro_batch_size": 2, "out_dir": out, "run_name": "run"}}
    path = os.path.join(out, "soak.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def slope_per_100(steps, values) -> float:
    """Least-squares slope of values over steps, times 100 (MB per 100 steps for RSS)."""
    if len(steps) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(steps, float), np.asarray(values, float), 1)[0] * 100)


def run_soak(out: str, *, steps: int = 300, teacher: str | None = None, student: str | None = None,
             queue_size: int = 2, max_staleness: int = 1, save_every: int = 50, poll_s: float = 0.5,
             timeout_s: float = 3600.0,
             deepspeed_config: str = os.path.join(REPO, "ds_configs/zero3.json")) -> dict:
    """Run the soak, write out/soak.json, and return it: per-step series, server pids, verdict numbers."""
    os.makedirs(out, exist_ok=True)
    if teacher is None or student is None:
        from topd_ds.tasks.models import save_tiny_pair

        teacher, student = save_tiny_pair(os.path.join(out, "models"))
    path = write_config(out, teacher, student, steps=steps, queue_size=queue_size, max_staleness=max_staleness,
                        save_every=save_every, deepspeed_config=deepspeed_config)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.time()
    with open(os.path.join(out, "train.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "topd_ds.cli", "train", "--config", path, "--resume", "none"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        seen = {}  # every child of the trainer seen while it ran: pid -> command line
        while proc.poll() is None:
            for pid in procstat.children(proc.pid):
                seen.setdefault(pid, procstat.cmdline(pid))
            if time.time() - t0 > timeout_s:
                proc.kill()
            time.sleep(poll_s)
    wall_s = time.time() - t0
    # The servers by command line: a short-lived helper child (once in CI a third pid, started after the servers;
    # op loaders run subprocesses such as `ninja --version`) is no server, but it must be gone at exit too.
    servers = sorted(p for p, cmd in seen.items() if SERVER_MODULE in cmd)
    others = {p: cmd for p, cmd in seen.items() if p not in servers}
    alive_at_exit = sorted(p for p in seen if procstat.alive(p))
    history = []
    if proc.returncode == 0:
        with open(os.path.join(out, "run", "summary.json")) as f:
            history = json.load(f)["history"]
    series = {key: [h.get(key) for h in history] for key in
              ("step", "mem/rss_mb", "mem/peak_rss_mb", "sys/threads", "sys/py_threads", "sys/children",
               "mem/children_rss_mb", "pipeline/queue_depth", "pipeline/staleness", "time/step_s")}
    half = len(history) // 2
    second = {k: v[half:] for k, v in series.items()}
    result = {
        "steps": steps, "returncode": proc.returncode, "wall_s": wall_s, "queue_size": queue_size,
        "max_staleness": max_staleness, "servers": servers, "other_children": others,
        "children_alive_at_exit": alive_at_exit,
        "rss_slope_mb_per_100": slope_per_100(second["step"], second["mem/rss_mb"]),
        "servers_rss_slope_mb_per_100": slope_per_100(second["step"], second["mem/children_rss_mb"]),
        "rss_mb_first_last": [series["mem/rss_mb"][0], series["mem/rss_mb"][-1]] if history else None,
        "threads_second_half": sorted(set(second["sys/threads"])),
        "py_threads_second_half": sorted(set(second["sys/py_threads"])),
        "threads_all": sorted(set(series["sys/threads"])),
        "children_all": sorted(set(series["sys/children"])),
        "max_queue_depth": max(series["pipeline/queue_depth"], default=None),
        "max_staleness_seen": max(series["pipeline/staleness"], default=None),
        "series": series,
    }
    result["ok"] = bool(
        proc.returncode == 0 and len(history) == steps and abs(result["rss_slope_mb_per_100"]) < RSS_SLOPE_LIMIT_MB
        and len(result["threads_second_half"]) == 1 and len(result["py_threads_second_half"]) == 1
        and result["max_queue_depth"] <= queue_size and result["max_staleness_seen"] <= max_staleness
        and result["children_all"] == [2] and len(servers) == 2 and not alive_at_exit)
    with open(os.path.join(out, "soak.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def verdict(r: dict) -> str:
    if r["returncode"] != 0:
        return f"FAIL: trainer exited with {r['returncode']} (see train.log)"
    return (f"{'PASS' if r['ok'] else 'FAIL'}: {r['steps']} steps in {r['wall_s']:.0f} s; trainer RSS "
            f"{r['rss_mb_first_last'][0]:.0f} -> {r['rss_mb_first_last'][1]:.0f} MB, slope over the second half "
            f"{r['rss_slope_mb_per_100']:+.2f} MB/100 steps (limit {RSS_SLOPE_LIMIT_MB}), servers "
            f"{r['servers_rss_slope_mb_per_100']:+.2f} MB/100 steps; threads (second half) {r['threads_second_half']}"
            f" kernel, {r['py_threads_second_half']} Python; queue depth <= {r['max_queue_depth']:.0f} "
            f"(queue_size {r['queue_size']}); staleness <= {r['max_staleness_seen']:.0f}; live servers during the "
            f"run {r['children_all']}; children alive after exit: {r['children_alive_at_exit'] or 'none'} "
            f"(server pids {r['servers']}, other children seen {r['other_children'] or 'none'})")


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["series"]
    fig, ax = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax[0].plot(s["step"], s["mem/rss_mb"], label="trainer RSS")
    ax[0].plot(s["step"], s["mem/peak_rss_mb"], "--", label="trainer peak RSS")
    ax[0].plot(s["step"], np.asarray(s["mem/children_rss_mb"]) / 2, label="servers RSS / 2 (two servers)")
    ax[0].set_ylabel("MB")
    ax[0].legend()
    ax[0].set_title(f"soak: {r['steps']} TOPD steps, max_staleness {r['max_staleness']}, queue_size {r['queue_size']}\n"
                    f"trainer RSS slope over the second half {r['rss_slope_mb_per_100']:+.2f} MB / 100 steps",
                    fontsize=10)
    ax[1].plot(s["step"], s["sys/threads"], label="kernel threads")
    ax[1].plot(s["step"], s["sys/py_threads"], label="Python threads")
    ax[1].plot(s["step"], s["sys/children"], label="live child processes")
    ax[1].set_ylabel("count")
    ax[1].legend()
    ax[2].plot(s["step"], s["pipeline/queue_depth"], ".", label="queue depth at get()")
    ax[2].plot(s["step"], s["pipeline/staleness"], ".", label="staleness")
    ax[2].axhline(r["queue_size"], color="gray", ls=":", label="queue_size")
    ax[2].set_xlabel("step")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "soak"))
    ap.add_argument("--save-every", type=int, default=50)
    args = ap.parse_args(argv)
    r = run_soak(os.path.abspath(args.out), steps=args.steps, save_every=args.save_every)
    if r["returncode"] == 0:
        plot(r, os.path.join(args.out, "soak.png"))
    print(verdict(r))
    print(f"wrote {os.path.join(args.out, 'soak.json')} and soak.png")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
