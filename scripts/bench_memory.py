"""Peak memory of one micro-step's loss terms on this CPU, old (direct) path against the new one, and its growth.

    python scripts/bench_memory.py [--quick] [--out runs/bench_memory.json]

Each sweep (one term, one path, one variable growing) runs in a fresh process, so the process's peak RSS after
each step is that step's (freed heap is returned with malloc_trim before each baseline): a tiny random Qwen3 student
(hidden 64, 2 layers) and a random teacher head, one micro-batch of B = 1 sequence of T tokens (half prompt,
half response) over a vocabulary of V tokens, with M divergent points of window K in TOPD mode; the step is
the objective's forward + backward (no optimizer). Reported: peak RSS during the step minus RSS before it.

    term   opd     stage2_loss, mode opd, full-vocabulary estimator from teacher hidden states
           topd    stage2_loss, mode topd (OPD + trajectory term over M windows)
           kd      stage1_loss, kd_ratio 0.5, teacher hidden states
    path   old     tests/reference_objective.py: full (T, V) student logits; one forward per window on
                   prefix + window (the code before issue 16)
           new     topd_ds/loss/objective.py: one packed forward to hidden states; lm_head in chunks (LossHead)

The growth of each (term, path) is fitted as peak ~ c * x^a over each swept variable (log-log least squares);
docs/SCALING.md uses these exponents next to the analytic projection at the paper's shapes.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(T=512, V=8192, M=8, K=16)
SWEEPS = {"T": [256, 512, 1024, 2048], "V": [2048, 4096, 8192, 16384], "M": [2, 8, 32], "K": [8, 16, 32]}
QUICK = {"T": [256, 1024], "V": [2048, 8192], "M": [2, 16], "K": [8, 32]}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_sweep(term: str, path: str, points: list) -> list:
    """(in the child) MB of peak RSS above the pre-step RSS for one forward + backward at each point.
    Points grow along one variable, so the process-wide peak (ru_maxrss) after each step is that step's;
    freed heap is handed back (malloc_trim) before each baseline."""
    import ctypes
    import gc

    libc = ctypes.CDLL("libc.so.6")
    out = []
    for point in points:
        step = _prepare(term, path, **point)
        gc.collect()
        libc.malloc_trim(0)
        before = rss_mb()
        step()
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)
        del step
    return out


def _prepare(term: str, path: str, T: int, V: int, M: int, K: int):
    """A closure running one forward + backward of `term` on the `path` objective at this shape."""
    import torch

    sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
    from topd_ds.rollout.batch import Batch, Windows
    from topd_ds.config import config_from_dict
    from topd_ds.tasks.models import build_model

    if path == "old":
        import reference_objective as objective
    else:
        from topd_ds.loss import objective
    torch.manual_seed(0)
    student = build_model("qwen3", vocab_size=V, hidden=64, layers=2, heads=4, max_positions=T + K + 8).train()
    ht = 64
    head = torch.randn(V, ht)
    P = T // 2
    seq = [1] + torch.randint(4, V, (T - 1,)).tolist()
    batch = Batch(step=0, weight_version=0, sequences=[seq], prompt_lens=[P],
                  teacher_hidden=[torch.randn(T - P, ht)])
    batch.marked = [torch.zeros(T - P, dtype=torch.bool)]
    pos = torch.linspace(P + 1, T - 2, M).long()
    mask = torch.ones(M, K, dtype=torch.bool)
    plan = torch.rand(M, K, K)
    batch.windows = Windows(torch.zeros(M, dtype=torch.long), pos, torch.randint(4, V, (M, K)), mask,
                            torch.randint(4, V, (M, K)), mask.clone(), plan / plan.sum((1, 2), keepdim=True),
                            torch.rand(M))
    cfg = config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                            "topd": {"mode": "topd" if term == "topd" else "opd"}, "opd": {"chunk_size": 256},
                            "rollout": {"n_per_prompt": 1, "prompts_per_step": 1},
                            "train": {"global_batch_size": 1, "micro_batch_size": 1}}, check_paths=False)
    if path == "new":
        objective.loss_head(student)  # attached before the baseline

    def step():
        if term == "kd":
            loss, _ = objective.stage1_loss(student, batch.sequences, batch.prompt_lens, batch.teacher_hidden,
                                            cfg=cfg, teacher_head=head, pad_id=0, device="cpu")
        else:
            loss, _ = objective.stage2_loss(student, batch, [0], cfg=cfg, teacher_head=head, pad_id=0, device="cpu")
        loss.backward()
    return step


def run_child(term, path, points) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    code = (f"import sys; sys.path.insert(0, {os.path.join(REPO, 'scripts')!r}); import bench_memory as b; "
            f"print(b.measure_sweep({term!r}, {path!r}, {points!r}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"{term} {path} {points}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-3)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two points per sweep")
    ap.add_argument("--terms", default="opd,topd,kd", help="comma-separated subset of opd,topd,kd")
    ap.add_argument("--vars", default="T,V,M,K", help="comma-separated subset of the swept variables")
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "bench_memory.json"))
    args = ap.parse_args()
    sweeps = {k: v for k, v in (QUICK if args.quick else SWEEPS).items() if k in args.vars.split(",")}
    terms = [t for t in ("opd", "topd", "kd") if t in args.terms.split(",")]
    rows = []
    for term in terms:
        for var, values in sweeps.items():
            if var in ("M", "K") and term != "topd":
                continue
            for path in ("old", "new"):
                ys = run_child(term, path, [{**BASE, var: v} for v in values])  # one process per sweep
                for v, y in zip(values, ys):
                    print(f"{term:5s} {path:4s} {var}={v:6d} peak +{y:8.1f} MB", flush=True)
                rows.append({"term": term, "path": path, "var": var, "values": values, "peak_mb": ys,
                             "exponent": slope(values, ys)})
    print("\nterm  var  old: MB at sweep points (exponent)          new: MB at sweep points (exponent)")
    for term in terms:
        for var in sweeps:
            pair = [r for r in rows if r["term"] == term and r["var"] == var]
            if not pair:
                continue
            old, new = (next(r for r in pair if r["path"] == p) for p in ("old", "new"))
            fmt = lambda r: " ".join(f"{y:.0f}" for y in r["peak_mb"]) + f" (x^{r['exponent']:.2f})"  # noqa: E731
            print(f"{term:5s} {var:3s}  {fmt(old):40s} {fmt(new)}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"base": BASE, "rows": rows}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
