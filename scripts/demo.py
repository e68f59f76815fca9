"""`make demo`: stage 1 KD (teacher samples, then training), then OPD and TOPD from the same stage-1 student, on the built-in arith task (CPU).

    .venv/bin/python scripts/demo.py [--quick]

Builds the arith models first if `models/arith/` is missing (see docs/ARITH.md), then runs three trainings
with `topd-ds train`, each starting and stopping its own built-in servers, and prints the eval accuracy
before and after each run with where its logs, checkpoints and export went.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models", "arith")


def run(cmd):
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def train(config, *overrides):
    run([sys.executable, "-m", "topd_ds.cli", "train", "--config", config, "--resume", "none", *overrides])


def evals(run_name):
    with open(os.path.join(REPO, "runs", run_name, "summary.json")) as f:
        ev = json.load(f)["eval"]
    steps = sorted(ev, key=int)
    return ev[steps[0]], ev[steps[-1]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps of each stage (smoke test)")
    args = ap.parse_args()
    t0 = time.time()
    if not os.path.isfile(os.path.join(MODELS, "report.json")):
        print("models/arith missing: building them (trains the teacher; see docs/ARITH.md)", flush=True)
        run([sys.executable, "-m", "topd_ds.cli", "make-models", "--out", MODELS])
    quick = ["train.steps=3", "train.eval_samples=32"] if args.quick else []
    kd_quick = ["kd.n_samples=64"] if args.quick else []
    # stage 1's teacher responses are sampled before training (resumable), then read by the trainer
    run([sys.executable, "-m", "topd_ds.cli", "sample", "--config", "configs/demo/stage1_kd.yaml", *kd_quick])
    train("configs/demo/stage1_kd.yaml", *quick, *kd_quick)
    stage1 = os.path.join("runs", "demo-kd", "final")
    train("configs/demo/opd.yaml", f"model.student={stage1}", *quick)
    train("configs/demo/topd.yaml", f"model.student={stage1}", *quick)

    print(f"\n== topd-ds demo: arith task, CPU, {time.time() - t0:.0f} s ==")
    print(f"{'run':<22}{'pass@1 before':>15}{'pass@1 after':>14}")
    for name, label in (("demo-kd", "stage 1 KD"), ("demo-opd", "stage 2 OPD"), ("demo-topd", "stage 2 TOPD")):
        before, after = evals(name)
        print(f"{label:<22}{100 * before:>14.1f}%{100 * after:>13.1f}%")
    print("\nexports:     runs/demo-{kd,opd,topd}/final   (save_pretrained; loads in transformers)")
    print("checkpoints: runs/demo-*/checkpoints/")
    print("TensorBoard: .venv/bin/tensorboard --logdir runs/")


if __name__ == "__main__":
    main()
