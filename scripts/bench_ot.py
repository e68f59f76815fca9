"""Benchmark OT solvers on B x K x K token-window costs: scipy exact, torch Sinkhorn (eager), Triton (CUDA), POT.

    .venv/bin/python scripts/bench_ot.py [--B 218 --K 50 --D 2560 --eps 1e-3 --json out.json]

Two cost families: "random" (1 - cos between windows of random tokens of a random dim-D embedding: all costs
within 1 +- 0.07) and "zipf" (windows drawn from a 200-token Zipf vocabulary: repeated tokens, ties, zero costs).
Prints ms (best of --repeat), ratio to scipy exact, and max / mean relative error of the distance vs exact.
"""

import argparse
import json
import time

import numpy as np
import torch

from topd_ds.ot import exact_ot, sinkhorn, token_cost


def make_costs(B: int, K: int, D: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(4000, D, generator=g)
    rand = token_cost(emb, torch.randint(0, 4000, (B, K), generator=g), torch.randint(0, 4000, (B, K), generator=g))
    V = 200
    p = 1.0 / np.arange(1, V + 1) ** 1.1
    rng = np.random.default_rng(seed)
    za = torch.from_numpy(rng.choice(V, (B, K), p=p / p.sum()))
    zb = torch.from_numpy(rng.choice(V, (B, K), p=p / p.sum()))
    return {"random": rand, "zipf": token_cost(emb[:V], za, zb)}


def best_time(fn, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=218)
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--D", type=int, default=2560)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--fixed_iter", type=int, default=600, help="iterations of the Triton kernel (CUDA only)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name, cost in make_costs(args.B, args.K, args.D, args.seed).items():
        t_ex, (_, d_ex) = best_time(lambda: exact_ot(cost.double()), args.repeat)
        d_ex = d_ex.numpy()
        runs = {"scipy exact": (t_ex, d_ex)}
        for dt in (torch.float32, torch.float64):
            c = cost.to(dt)
            t, (_, info) = best_time(lambda: sinkhorn(c, eps=args.eps, tol=args.tol), args.repeat)
            runs[f"torch sinkhorn {str(dt)[6:]} (cpu)"] = (t, info.distance.double().numpy())
        if torch.cuda.is_available():
            c = cost.cuda()
            t, (_, info) = best_time(lambda: sinkhorn(c, eps=args.eps, tol=args.tol, backend="torch"), args.repeat)
            runs["torch sinkhorn float32 (cuda eager)"] = (t, info.distance.double().cpu().numpy())
            t, (_, info) = best_time(lambda: sinkhorn(c, eps=args.eps, fixed_iter=args.fixed_iter, backend="triton"),
                                     args.repeat)
            runs[f"triton sinkhorn float32 ({args.fixed_iter} it)"] = (t, info.distance.double().cpu().numpy())
        try:
            import ot as pot

            c = cost.double().numpy()
            u = np.full(args.K, 1.0 / args.K)

            def run_pot():
                out = []
                for k in range(args.B):
                    s = c[k].max() - c[k].min()
                    out.append(pot.sinkhorn2(u, u, c[k], args.eps * s, method="sinkhorn_log", stopThr=args.tol))
                return np.array(out)

            runs["POT sinkhorn_log (loop)"] = best_time(run_pot, 1)
        except ImportError:
            pass
        for solver, (t, d) in runs.items():
            rel = np.abs(d - d_ex) / np.abs(d_ex)
            rows.append(dict(costs=name, solver=solver, ms=t, ratio=t / t_ex, rel_max=float(rel.max()),
                             rel_mean=float(rel.mean())))
    print(f"B={args.B} K={args.K} D={args.D} eps={args.eps} (relative to cost spread) tol={args.tol}")
    print("| costs | solver | ms | x exact | rel err max | rel err mean |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['costs']} | {r['solver']} | {r['ms']:.1f} | {r['ratio']:.1f} | {r['rel_max']:.1e} | {r['rel_mean']:.1e} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(args=vars(args), rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
