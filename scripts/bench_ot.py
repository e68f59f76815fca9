"""Benchmark OT solvers on B x K x K token-window costs: scipy exact, torch Sinkhorn (eager; CUDA graph of the
fixed-iteration entry on CUDA), Triton (CUDA), POT.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_ot.py [--B 218 --K 50 --D 2560 --eps 1e-3 --tol 1e-3
        --clock wall|cpu --ablations --baseline old_sinkhorn.py --json out.json]

Two cost families: "random" (1 - cos between windows of random tokens of a random dim-D embedding: all costs
within 1 +- 0.07) and "zipf" (windows drawn from a 200-token Zipf vocabulary: repeated tokens, ties, zero costs).
Prints ms (best of --repeat, all solvers run round-robin so they share the machine's load), ratio to scipy
exact, and max / mean relative error of the distance vs exact.
"""

import argparse
import importlib.util
import json
import time

import numpy as np
import torch

from topd_ds.ot import exact_ot, sinkhorn, sinkhorn_fixed, token_cost


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


def time_interleaved(fns: dict, repeat: int, clock) -> dict[str, tuple[float, object]]:
    """Best-of-`repeat` ms of each fn, the fns run round-robin so that all see the same machine load."""
    outs = {k: fn() for k, fn in fns.items()}  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for k, fn in fns.items():
            t = clock()
            outs[k] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[k] = min(best[k], clock() - t)
    return {k: (best[k] * 1e3, outs[k]) for k in fns}


def cuda_graph_solver(cost: torch.Tensor, *, eps: float, iters: int):
    """`sinkhorn_fixed` (no host syncs) captured once in a CUDA graph; each call replays it on the same static
    buffers. Uniform marginals. Returns fn -> (B,) float64 numpy distances. Written for a GPU session: not run
    on the CPU machine that wrote it."""
    a = torch.full(cost.shape[:2], 1.0 / cost.shape[1], device=cost.device)
    b = torch.full((cost.shape[0], cost.shape[2]), 1.0 / cost.shape[2], device=cost.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: kernels compiled, allocator primed
        for _ in range(2):
            sinkhorn_fixed(cost, a, b, eps=eps, iters=iters)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, info = sinkhorn_fixed(cost, a, b, eps=eps, iters=iters)

    def run():
        graph.replay()
        return info.distance.double().cpu().numpy()
    return run


def kernel_only(cost: torch.Tensor, *, eps: float, iters: int):
    """The fused kernel's launch, the plan and its price on inputs prepared once (normalised cost, uniform
    marginals): what the whole `sinkhorn` call adds on top (validation syncs, normalisation, rounding) is the
    difference between the two Triton rows. Returns fn -> (B,) distances of the unrounded plan. CUDA only."""
    from topd_ds.ot.sinkhorn import eps_schedule, normalise_cost, resolve_marginals, split_iters
    from topd_ds.ot.stages import kernel, triton_stages

    a, b = resolve_marginals(cost)
    c_n, _, _ = normalise_cost(cost, a > 0, b > 0)
    schedule = eps_schedule(eps, 0.2)
    per = split_iters(iters, len(schedule))

    def run():
        f, g, _, _, _ = triton_stages(c_n, a, b, schedule, iters=per)
        return (kernel(c_n, f, g, schedule[-1]) * cost).sum((1, 2)).double().cpu().numpy()
    return run


def solvers(cost: torch.Tensor, args) -> dict:
    """name -> fn returning (B,) float64 numpy distances."""
    kw = dict(eps=args.eps, tol=args.tol)
    dist = lambda out: out[1].distance.double().cpu().numpy()
    c32, c64 = cost.float(), cost.double()
    fns = {
        "scipy exact": lambda: exact_ot(c64)[1].numpy(),
        "torch sinkhorn float32 (cpu)": lambda: dist(sinkhorn(c32, **kw)),
        "torch sinkhorn float64 (cpu)": lambda: dist(sinkhorn(c64, **kw)),
    }
    if args.baseline:  # an older sinkhorn.py, e.g. `git show <commit>:topd_ds/ot/sinkhorn.py > /tmp/old.py`
        spec = importlib.util.spec_from_file_location("baseline_sinkhorn", args.baseline)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        fns["baseline sinkhorn float32 (cpu)"] = lambda: dist(old.sinkhorn(c32, **kw))
    if args.ablations:
        fns["  float32, omega 1 (no over-relaxation)"] = lambda: dist(sinkhorn(c32, omega=1.0, **kw))
        fns["  float32, dedup off"] = lambda: dist(sinkhorn(c32, dedup=False, **kw))
        fns["  float32, omega 1, dedup off"] = lambda: dist(sinkhorn(c32, omega=1.0, dedup=False, **kw))
    if torch.cuda.is_available():
        cc = cost.cuda()
        fns["torch sinkhorn float32 (cuda eager)"] = lambda: dist(sinkhorn(cc, backend="torch", **kw))
        fns[f"triton sinkhorn float32 ({args.fixed_iter} it)"] = lambda: dist(
            sinkhorn(cc, eps=args.eps, fixed_iter=args.fixed_iter, backend="triton"))
        fns[f"triton kernel + plan, no checks ({args.fixed_iter} it)"] = kernel_only(cc, eps=args.eps, iters=args.fixed_iter)
        try:
            fns[f"torch sinkhorn_fixed float32 (cuda graph, {args.fixed_iter} it)"] = cuda_graph_solver(
                cc, eps=args.eps, iters=args.fixed_iter)
        except Exception as err:  # report and go on: the other rows still count
            print(f"cuda graph row skipped: capture failed: {type(err).__name__}: {err}")
    try:
        import ot as pot

        c = c64.numpy()
        u = np.full(args.K, 1.0 / args.K)

        def run_pot():
            return np.array([pot.sinkhorn2(u, u, c[k], args.eps * (c[k].max() - c[k].min()), method="sinkhorn_log",
                                           stopThr=args.tol) for k in range(args.B)])

        fns["POT sinkhorn_log (loop)"] = run_pot
    except ImportError:
        pass
    return fns


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=218)
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--D", type=int, default=2560)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--fixed_iter", type=int, default=600, help="iterations of the Triton kernel (CUDA only)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time, steadier than wall time on a machine shared with other jobs")
    ap.add_argument("--ablations", action="store_true", help="also time the solver without over-relaxation / dedup")
    ap.add_argument("--baseline", default=None, help="path of an older sinkhorn.py to time in the same run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows = []
    for name, cost in make_costs(args.B, args.K, args.D, args.seed).items():
        runs = time_interleaved(solvers(cost, args), args.repeat, clock)
        t_ex, d_ex = runs["scipy exact"]
        for solver, (t, d) in runs.items():
            rel = np.abs(d - d_ex) / np.abs(d_ex)
            rows.append(dict(costs=name, solver=solver, ms=t, ratio=t / t_ex, rel_max=float(rel.max()),
                             rel_mean=float(rel.mean())))
    print(f"B={args.B} K={args.K} D={args.D} eps={args.eps} (relative to cost spread) tol={args.tol} "
          f"clock={args.clock} best of {args.repeat}, solvers interleaved")
    print("| costs | solver | ms | x exact | rel err max | rel err mean |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['costs']} | {r['solver']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['rel_max']:.1e} "
              f"| {r['rel_mean']:.1e} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(args=vars(args), rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
