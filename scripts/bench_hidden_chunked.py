"""Cost of teacher hidden states under chunked prefill: requests and prefilled tokens per scored sequence.

    python scripts/bench_hidden_chunked.py --url http://127.0.0.1:30112 --model DIR [--n 8] [--lo 60 --hi 100]

Against a running SGLang (e.g. `scripts/sglang_cpu.sh serve DIR 30112 --chunked-prefill-size 16`): scores
the same n sequences with and without hidden states through SGLangClient (interleaved, 3 rounds each) and
reports wall time, /generate requests and tokens the server prefilled (input length - cached prefix it
was allowed to reuse), then the same arithmetic at the paper's shape (9,688-token sequences, chunk 8192).
"""

import argparse
import asyncio
import statistics
import time

import torch

from topd_ds.engines.sglang import SGLangClient


class Counting(SGLangClient):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.requests = self.tokens = 0

    async def _generate_call(self, payload, expected):
        ids = payload["input_ids"]
        ids = ids if isinstance(ids[0], list) else [ids]
        starts = payload.get("logprob_start_len", 0)
        starts = starts if isinstance(starts, list) else [starts] * len(ids)
        self.requests += 1
        self.tokens += sum(len(q) - s for q, s in zip(ids, starts))
        return await super()._generate_call(payload, expected)


def tokens_prefilled(L: int, chunk: int) -> int:
    """The client's requests for one sequence alone on the server: L, then one chunk per missing chunk."""
    tail = L - chunk * ((L - 1) // chunk)
    return L + (L - tail)


async def main(args):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.model)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, cfg.vocab_size, (int(n),), generator=g).tolist()
            for n in torch.randint(args.lo, args.hi + 1, (args.n,), generator=g)]
    starts = [len(q) // 3 for q in seqs]
    rows = {}
    async with Counting(args.url, hidden_size=cfg.hidden_size, prompts_per_request=args.per_request) as client:
        chunk = await client._chunk_size()
        for _ in range(3):
            for hidden in (False, True):
                await client.flush_cache()
                client.requests = client.tokens = 0
                t0 = time.perf_counter()
                await client.score(seqs, start=starts, top_k=0, return_hidden=hidden)
                rows.setdefault(hidden, []).append((time.perf_counter() - t0, client.requests, client.tokens))
    total = sum(map(len, seqs))
    print(f"server chunked_prefill_size {chunk}; {args.n} sequences of {args.lo}-{args.hi} tokens ({total} tokens), "
          f"{args.per_request} per request")
    for hidden in (False, True):
        t = statistics.median(r[0] for r in rows[hidden])
        print(f"  hidden={hidden!s:5}  median {t:.2f} s  requests {rows[hidden][0][1]}  "
              f"tokens prefilled {rows[hidden][0][2]} ({rows[hidden][0][2] / total:.2f}x)")
    print(f"  wall ratio hidden / logprobs only: "
          f"{statistics.median(r[0] for r in rows[True]) / statistics.median(r[0] for r in rows[False]):.2f}")
    for L, c in ((9688, 8192), (9688, 16384), (16384, 8192)):
        print(f"paper shape: L={L}, chunk {c}: {tokens_prefilled(L, c)} tokens prefilled "
              f"({tokens_prefilled(L, c) / L:.2f}x), {1 + (L - 1) // c} requests")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--lo", type=int, default=60)
    ap.add_argument("--hi", type=int, default=100)
    ap.add_argument("--per-request", type=int, default=1)
    asyncio.run(main(ap.parse_args()))
