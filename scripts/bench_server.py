"""Tokens/s of the built-in server against plain transformers `generate` on the same batch.

    .venv/bin/python scripts/bench_server.py [--prompts 64] [--new-tokens 64] [--device cpu] [--repeats 3]

Model: a random tiny arith-sized Qwen3 (hidden 128, 4 layers, vocab 20 = the char tokenizer), float32.
Batch: 64 prompts of 5..12 tokens, 64 new tokens each (ignore_eos, temperature 1, full vocabulary).
Measured (best of --repeats after one warm-up each, the methods taking turns):
  transformers   model.generate on the left-padded batch (sampling, min_new_tokens = max_new_tokens)
  engine         HFEngine.generate in-process (our batched prefill + KV-cached decode, no HTTP)
  server/batch   `topd-ds serve` child, one /generate with all 64 prompts, through SGLangClient
  server/concur  the same server, 64 concurrent one-prompt requests (the batching window merges them)
"""

import argparse
import asyncio
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from topd_ds.engines.hf_engine import HFEngine, Row
from topd_ds.engines.launch import launch_server
from topd_ds.engines.protocol import SamplingParams
from topd_ds.engines.sglang import SGLangClient
from topd_ds.tasks.models import build_model, save_model
from topd_ds.tasks.chartok import build_char_tokenizer


def interleaved_best(fns: dict, repeats: int) -> dict:
    """Best wall time of each callable; one warm-up each, then the methods take turns (a shared,
    busy machine slows them alike instead of whichever happened to run during a load spike)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    tok = build_char_tokenizer()
    model = build_model("qwen3", seed=0, vocab_size=len(tok), hidden=128, layers=4, heads=4, max_positions=256,
                        pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    model_dir = save_model(model, os.path.join(tempfile.mkdtemp(prefix="bench-"), "model"), tok)
    model = model.to(args.device)
    g = torch.Generator().manual_seed(0)
    prompts = [[tok.bos_token_id] + torch.randint(4, len(tok), (int(n) - 1,), generator=g).tolist()
               for n in torch.randint(5, 13, (args.prompts,), generator=g)]
    P, N = args.prompts, args.new_tokens
    total = P * N

    L = max(map(len, prompts))
    ids = torch.full((P, L), tok.pad_token_id)
    mask = torch.zeros((P, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(args.device), mask.to(args.device)

    def hf():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N,
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)
        assert out.shape == (P, L + N), out.shape

    engine = HFEngine(model_dir, device=args.device, max_batch=P)
    rows = [Row(input_ids=p, max_new_tokens=N, ignore_eos=True) for p in prompts]

    def eng():
        assert all(len(a["output_ids"]) == N for a in engine.generate(rows))

    params = SamplingParams(max_new_tokens=N, ignore_eos=True)
    with launch_server(model_dir, device=args.device, max_batch=P, batch_window_ms=20) as srv:
        async def through_client(per_request):
            async with SGLangClient(srv.url, prompts_per_request=per_request) as c:
                out = await c.generate(prompts, params)
            assert all(len(o[0].output_ids) == N for o in out)

        results = interleaved_best({
            "transformers": hf, "engine": eng,
            "server/batch": lambda: asyncio.run(through_client(P)),
            "server/concur": lambda: asyncio.run(through_client(1)),
        }, args.repeats)

    base = total / results["transformers"]
    print(f"{P} prompts x {N} new tokens = {total} tokens, device {args.device}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, best of {args.repeats}")
    for name, secs in results.items():
        rate = total / secs
        print(f"  {name:<14} {secs:7.3f} s  {rate:9.1f} tokens/s  ratio vs transformers {rate / base:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
