"""Write a deque prompt split restricted to a range of digit counts (docs/FIDELITY.md: the long-trace testbed).

    .venv/bin/python scripts/deque_split.py --items 11 11 --out models/deque/data/long [--n-train 2000 --n-eval 500] \
        [--n-val 500]

The warm-start student's greedy accuracy falls with the number of digits (95.5% at 9, 50.8% at 11: its errors
compound), so the 11-digit problems are where distillation has room. Train prompts are disjoint from the eval
rows of this split and of models/deque/data/eval.jsonl; both files are in the user data format (prompt, response,
answer), written to a temp name and renamed. `--n-val N` also writes val.jsonl: the next N distinct problems of the
same train stream, so it is disjoint from train.jsonl and from the eval rows, and train.jsonl / eval.jsonl stay
what they were without it (hyperparameters are chosen on val, results reported on eval: issue 25).
"""

import argparse
import json
import os

from topd_ds.tasks import deque


def write_jsonl(path, problems):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for p in problems:
            f.write(json.dumps(p.as_record()) + "\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, nargs=2, required=True, metavar=("MIN", "MAX"), help="digits per prompt")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--n-val", type=int, default=0, help="validation problems (val.jsonl), disjoint from both")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--base-eval", default="models/deque/data/eval.jsonl", help="rows kept out of the train split too")
    args = ap.parse_args()
    kw = dict(min_items=args.items[0], max_items=args.items[1])
    evals = deque.make_eval_set(args.n_eval, seed=args.seed, **kw)
    exclude = {p.digits for p in evals}
    if os.path.exists(args.base_eval):
        with open(args.base_eval) as f:
            exclude |= {deque.digits_of(json.loads(line)["prompt"]) for line in f}
    stream = deque.train_stream(seed=args.seed, exclude=exclude, **kw)
    train, seen = [], set()
    while len(train) < args.n_train:
        p = next(stream)
        if p.digits not in seen:
            seen.add(p.digits)
            train.append(p)
    val = []
    while len(val) < args.n_val:  # drawn after train from the same stream: train.jsonl does not change
        p = next(stream)
        if p.digits not in seen:
            seen.add(p.digits)
            val.append(p)
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "eval.jsonl"), evals)
    if val:
        write_jsonl(os.path.join(args.out, "val.jsonl"), val)
    print(f"wrote {len(train)} train, {len(val)} val and {len(evals)} eval problems of {args.items[0]}-{args.items[1]} digits to {args.out}")


if __name__ == "__main__":
    main()
