"""Ctrl-C at random moments of a training run, many times: exit code, time to exit, the last stderr line.

Each run is tests/test_soak.py's Ctrl-C set-up (a 1000-step `topd-ds train` on the tiny models, partitioned
ZeRO-3, two launched servers): once the step-2 checkpoint exists, wait a random 0-2 s, send SIGINT to the process
group, record what happened. Before topd_ds/interrupt.py, 1 of 6 runs here hung ~2 min in TensorBoard's close and CI
once saw functorch's internal assert; docs/RELIABILITY.md has the counts.

    .venv/bin/python scripts/ctrl_c_stress.py --runs 30 --out docs/records/ctrl-c-stress.jsonl
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def one_run(teacher, student, delay_s, timeout_s=60.0, repo=REPO):
    from test_soak import PARTITIONED, soak
    from test_train_e2e import child_env, start_interruptible

    with tempfile.TemporaryDirectory() as d:
        path = soak.write_config(d, teacher, student, steps=1000, queue_size=2, max_staleness=1, save_every=2,
                                 deepspeed_config=PARTITIONED)
        proc = start_interruptible([sys.executable, "-m", "topd_ds.cli", "train", "--config", path], cwd=repo,
                                   env=child_env(PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        manifest = os.path.join(d, "run", "checkpoints", "step-00000002", "manifest.json")
        while not os.path.exists(manifest) and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(delay_s)
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            return {"delay_s": delay_s, "returncode": None, "hung": True, "exit_s": timeout_s}
        lines = err.rstrip().splitlines()
        return {"delay_s": round(delay_s, 3), "returncode": proc.returncode, "hung": False,
                "exit_s": round(time.monotonic() - t0, 2), "traceback": "Traceback" in err,
                "last_line": lines[-1] if lines else "",
                "stopped_line": next((line for line in lines if line.startswith("stopped at step ")), None)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repo", default=REPO, help="the checkout whose topd_ds runs (an older commit's worktree: "
                                                  "the before-and-after comparison)")
    args = ap.parse_args()
    from topd_ds.tasks.models import save_tiny_pair  # the tests' tiny teacher and student, built offline

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as models:
        teacher, student = save_tiny_pair(models)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            for i in range(args.runs):
                r = {"run": i, **one_run(teacher, student, rng.uniform(0.0, 2.0), repo=args.repo)}
                f.write(json.dumps(r) + "\n")
                f.flush()
                print(json.dumps(r), flush=True)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
