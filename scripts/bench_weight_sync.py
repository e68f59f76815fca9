"""Bytes and seconds of one disk weight sync at the paper's student shape (Qwen3-4B), measured on a slice.

    python scripts/bench_weight_sync.py [--layers 4] [--dirs /work/tmp-sync /dev/shm/topd-bench]

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dirs", nargs="+", default=["/work/tmp-sync-bench", "/dev/shm/topd-sync-bench"])
    args = ap.parse_args()
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
