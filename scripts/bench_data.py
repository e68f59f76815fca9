"""Start-up time and peak memory of the prompt loader on a large generated source (issue 17).

    .venv/bin/python scripts/bench_data.py --rows 1200000 --out /tmp/bench_data

Writes an OpenThoughts3-shaped source (ShareGPT `conversations`: a ~300-character math prompt and a ~2,000-character
response per row) as JSONL and as Parquet (row groups of 1,000 rows), then, each in a fresh process, opens it
as the trainer does (`PromptSet.open`, data.check_rows rows checked, the Qwen3-style ChatML template of
tests/chat_tokenizers.py) and draws the prompts of 26 steps (8 per step; the first also shuffles the epoch). Reported per format: file size, seconds to open
(index + check), seconds per drawn prompt, peak RSS of the process (ru_maxrss) and RSS before opening (the
baseline of python + torch-free imports). The old loader (read and tokenise every line up front) is measured on
the JSONL file too, unless --skip-old.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

WORDS = "the sum of all integers such that divides product remainder when is divided by find compute".split()


def make_row(rng: random.Random) -> dict:
    prompt = " ".join(rng.choice(WORDS) for _ in range(55)) + f" {rng.randrange(10**6)}?"
    response = " ".join(rng.choice(WORDS) for _ in range(360)) + f" \\boxed{{{rng.randrange(1000)}}}"
    return {"difficulty": rng.randrange(10), "source": "synthetic", "domain": "math",
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]}


def write_sources(rows: int, out: str):
    """1,000 distinct generated rows, repeated with a unique number in each prompt (generation stays fast)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out, exist_ok=True)
    jsonl, parquet = os.path.join(out, "ot3.jsonl"), os.path.join(out, "ot3.parquet")
    if os.path.exists(jsonl) and os.path.exists(parquet):
        return jsonl, parquet
    rng = random.Random(0)
    pool = [make_row(rng) for _ in range(1000)]
    writer = None
    with open(jsonl + ".tmp", "w") as f:
        for start in range(0, rows, 10_000):
            chunk = []
            for i in range(start, min(start + 10_000, rows)):
                row = pool[i % 1000]
                human, gpt = row["conversations"]
                chunk.append({**row, "conversations": [{"from": "human", "value": f"{human['value']} (#{i})"}, gpt]})
            f.writelines(json.dumps(r) + "\n" for r in chunk)
            table = pa.Table.from_pylist(chunk)
            if writer is None:
                writer = pq.ParquetWriter(parquet + ".tmp", table.schema)
            writer.write_table(table, row_group_size=1000)
    writer.close()
    os.replace(jsonl + ".tmp", jsonl)
    os.replace(parquet + ".tmp", parquet)
    return jsonl, parquet


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(path: str, check_rows: int, old: bool) -> dict:
    """In this (fresh) process: open the set, draw 100 steps of 8 prompts."""
    from chat_tokenizers import build_chat_tokenizer

    from topd_ds.data import PromptFormat, PromptSet

    tok = build_chat_tokenizer("qwen3")
    base = rss_mb()
    t0 = time.perf_counter()
    if old:  # the pre-issue-17 behaviour: every line read, parsed and tokenised before the first step
        examples = []
        with open(path, "rb") as f:
            for line in f.read().split(b"\n"):
                if line.strip():
                    rec = json.loads(line)
                    text = rec["conversations"][0]["value"]
                    examples.append(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                            add_generation_prompt=True))
                    examples[-1] = tok.encode(examples[-1], add_special_tokens=False)
        open_s, n = time.perf_counter() - t0, len(examples)
        return {"open_s": open_s, "rows": n, "rss_before_mb": base,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    ps = PromptSet.open(path, tok, PromptFormat(), max_prompt_tokens=800, check_rows=check_rows)
    open_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    ps.for_step(0, 8, seed=0, shuffle=True)   # also shuffles the epoch's order (once per epoch)
    first_step_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    for step in range(1, 26):
        ps.for_step(step, 8, seed=0, shuffle=True)
    draw_s = (time.perf_counter() - t1) / 200
    return {"open_s": open_s, "first_step_s": first_step_s, "per_prompt_ms": 1000 * draw_s, "rows": len(ps), "rss_before_mb": base,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_200_000)
    ap.add_argument("--out", default="/tmp/bench_data")
    ap.add_argument("--check-rows", type=int, default=2_000)
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)   # path check_rows old
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.child[2] == "1")))
        return
    t0 = time.perf_counter()
    jsonl, parquet = write_sources(args.rows, args.out)
    print(f"sources ready in {time.perf_counter() - t0:.0f}s: {jsonl} ({os.path.getsize(jsonl) / 2**30:.2f} GiB), "
          f"{parquet} ({os.path.getsize(parquet) / 2**30:.2f} GiB)")
    runs = [("jsonl", jsonl, False), ("parquet", parquet, False)] + ([] if args.skip_old else [("jsonl, old loader", jsonl, True)])
    for name, path, old in runs:
        out = subprocess.run([sys.executable, __file__, "--child", path, str(args.check_rows), "1" if old else "0"],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        extra = (f", first step {r['first_step_s']:.2f}s (epoch order), then {r['per_prompt_ms']:.2f} ms per drawn "
                 f"prompt" if "per_prompt_ms" in r else "")
        print(f"{name:<18} rows {r['rows']:,}: open {r['open_s']:.1f}s{extra}; peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(before opening {r['rss_before_mb']:.0f} MB)", flush=True)


if __name__ == "__main__":
    main()
