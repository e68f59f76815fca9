"""Bytes and seconds of one weight sync: the disk write/read at the paper's student shape (Qwen3-4B), measured
on a slice; and each route of `train.weight_sync` end to end against a built-in server (`--routes`).

    python scripts/bench_weight_sync.py [--layers 4] [--dirs /work/tmp-sync /dev/shm/topd-bench]
    python scripts/bench_weight_sync.py --routes [--hidden 1024 --model-layers 10 --vocab 32000] [--repeat 3]

--routes builds a random Qwen3 of the given shape, starts `topd-ds serve` on it (float32, CPU) and syncs it
`--repeat` times by each route, as WeightSync does from rank 0 once the ZeRO-3 gather is done (not timed here):
  disk         save_pretrained in bf16 to /dev/shm + POST /update_weights_from_disk (the server reads the file)
  tensor       serialize (moves the tensors to shared memory: one copy) + POST /update_weights_from_tensor
  distributed  POST /update_weights_from_distributed + gloo broadcast of every tensor (the group is joined once,
               timed apart)
Reports bytes sent (bf16), best and median seconds per sync, and MB/s (bytes / best seconds).

Writes `--layers` decoder layers of Qwen3-4B's real shapes (hidden 2560, 32 q / 8 kv heads x 128,
MLP 9728) from random tensors, bf16 and fp32, as safetensors (what save_pretrained writes), to each directory,
then reads them back as a server does (safe_open, every tensor); best of 2 per dtype, MB/s, and the projection
to the whole model (36 layers + the 151,936 x 2560 tied embedding: 4.02e9 parameters). Deletes what it wrote.
The ZeRO-3 gather before the write and the server's copy to GPU are not in these numbers.
"""

import argparse
import os
import shutil
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

H, I, Q, KV, D, V, LAYERS = 2560, 9728, 32, 8, 128, 151_936, 36


def layer(i, dtype):
    g = torch.Generator().manual_seed(i)
    shapes = {"q_proj": (Q * D, H), "k_proj": (KV * D, H), "v_proj": (KV * D, H), "o_proj": (H, Q * D),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    return {f"model.layers.{i}.{k}.weight": torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def full_params() -> int:
    per_layer = sum(a * b for a, b in [(Q * D, H), (KV * D, H), (KV * D, H), (H, Q * D), (I, H), (I, H), (H, I)])
    return LAYERS * (per_layer + 4 * H) + V * H + H      # + norms, tied embedding, final norm


def bench_routes(args):
    import asyncio
    import statistics
    import sys
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from topd_ds.engines.launch import launch_server
    from topd_ds.engines.sglang import SGLangClient
    from topd_ds.tasks.models import build_model, save_model
    from topd_ds.comm.weight_group import destroy_group, free_port, init_group, serialize_named_tensors

    work = tempfile.mkdtemp(prefix="topd-bench-routes-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        model = build_model("qwen3", seed=0, vocab_size=args.vocab, hidden=args.hidden, layers=args.model_layers,
                            heads=args.heads, max_positions=512)
        model_dir = save_model(model, os.path.join(work, "model"))
        named = [(n, p.detach().to(torch.bfloat16).clone()) for n, p in model.named_parameters()]
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        n_params = sum(t.numel() for _, t in named)
        print(f"model: hidden {args.hidden}, {args.model_layers} layers, vocab {args.vocab}: {n_params / 1e6:.1f} M "
              f"parameters, {nbytes / 1e6:.1f} MB in bf16 ({len(named)} tensors)")
        with launch_server(model_dir, startup_timeout_s=600) as server:
            async def run():
                times, state = {}, {}
                async with SGLangClient([server.url], timeout_s=1200, max_retries=0) as client:
                    for i in range(args.repeat):
                        version = f"disk-{i}"
                        t0 = time.perf_counter()
                        path = os.path.join(work, version)
                        model.save_pretrained(path, state_dict=dict(named), safe_serialization=True)
                        await client.update_weights(path, version)
                        times.setdefault("disk", []).append(time.perf_counter() - t0)
                        shutil.rmtree(path, ignore_errors=True)
                    for i in range(args.repeat):
                        fresh = [(n, t.clone()) for n, t in named]   # as a new gather: not yet in shared memory
                        t0 = time.perf_counter()
                        await client.update_weights_from_tensor(serialize_named_tensors(fresh), f"tensor-{i}")
                        times.setdefault("tensor", []).append(time.perf_counter() - t0)
                        del fresh
                    port = free_port()

                    def join(world):
                        state["pg"] = init_group(backend="gloo", master_address="127.0.0.1", master_port=port,
                                                 world_size=world, rank=0, timeout_s=600)
                    t0 = time.perf_counter()
                    await client.init_weights_group(master_address="127.0.0.1", master_port=port, backend="gloo",
                                                    join=join)
                    times["group_init"] = [time.perf_counter() - t0]

                    def broadcast():
                        for _, t in named:
                            torch.distributed.broadcast(t, src=0, group=state["pg"])
                    for i in range(args.repeat):
                        t0 = time.perf_counter()
                        await client.update_weights_from_distributed(
                            [n for n, _ in named], ["bfloat16"] * len(named), [list(t.shape) for _, t in named],
                            f"dist-{i}", broadcast)
                        times.setdefault("distributed", []).append(time.perf_counter() - t0)
                    destroy_group(state["pg"])
                return times
            times = asyncio.run(run())
        print(f"group init (distributed, once per run): {times.pop('group_init')[0]:.2f} s")
        for route, ts in times.items():
            best = min(ts)
            print(f"{route:12} {nbytes / 1e6:8.1f} MB  best {best:6.2f} s  median {statistics.median(ts):6.2f} s  "
                  f"{nbytes / best / 1e6:7.0f} MB/s  (runs: {', '.join(f'{t:.2f}' for t in ts)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dirs", nargs="+", default=["/work/tmp-sync-bench", "/dev/shm/topd-sync-bench"])
    ap.add_argument("--routes", action="store_true", help="time each train.weight_sync route against a built-in server")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--model-layers", type=int, default=10)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.routes:
        return bench_routes(args)
    for dtype in (torch.bfloat16, torch.float32):
        state = {k: v for i in range(args.layers) for k, v in layer(i, dtype).items()}
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        whole = full_params() * torch.tensor([], dtype=dtype).element_size()
        for d in args.dirs:
            os.makedirs(d, exist_ok=True)
            best_w = best_r = float("inf")
            for _ in range(2):
                path = os.path.join(d, "model.safetensors")
                t0 = time.perf_counter()
                save_file(state, path)
                best_w = min(best_w, time.perf_counter() - t0)
                t0 = time.perf_counter()
                with safe_open(path, "pt") as f:
                    for k in f.keys():
                        f.get_tensor(k).clone()   # materialise: get_tensor may only map the file
                best_r = min(best_r, time.perf_counter() - t0)
                os.remove(path)
            shutil.rmtree(d, ignore_errors=True)
            w, r = nbytes / best_w / 1e6, nbytes / best_r / 1e6
            print(f"{str(dtype):15} {d:28} {nbytes / 1e9:.2f} GB slice: write {w:7.0f} MB/s, read {r:7.0f} MB/s; "
                  f"whole 4B student {whole / 1e9:.2f} GB -> write {whole / w / 1e6:5.1f} s + read {whole / r / 1e6:5.1f} s")


if __name__ == "__main__":
    main()
