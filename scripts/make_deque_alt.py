"""Build the deque_alt testbed's models (issue 25) by fine-tuning the committed deque models onto the variant:
the teacher to prefer the `lo hi` spelling of the ends, the warm-start student to prefer `hi lo`.

    .venv/bin/python scripts/make_deque_alt.py --out models/deque-alt [--seconds 150] [--teacher-steps 300]
        [--student-steps 150] [--teacher-lr 5e-5] [--student-lr 3e-4] [--teacher-swap 0.1] [--student-swap 0.9]
        [--quick]

The variant (topd_ds/tasks/deque_alt.py) keeps deque's alphabet, so no embedding changes: each model trains
supervised (topd_ds.tasks.make_models.train_supervised: AdamW, warm-up, cosine to 10%) on reference traces whose
ends pairs are written `hi lo` with probability --teacher-swap / --student-swap. High loss at the student's preferred
spelling is then frequent and benign, labelled by deque_alt.label. Writes OUT/{tokenizer,teacher,student}, OUT/data
(train.jsonl, eval.jsonl: 11-digit rows as in configs/deque-long, val.jsonl disjoint from both) and report.json
(accuracy, valid derivations, swap rate, steps, seconds). Minutes of CPU with the defaults; --quick for tests.
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, problems):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for p in problems:
            f.write(json.dumps(p.as_record()) + "\n")
    os.replace(path + ".tmp", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/deque-alt")
    ap.add_argument("--source", default="models/deque", help="the deque build whose teacher and student are fine-tuned")
    ap.add_argument("--seconds", type=float, default=150.0, help="time budget per model")
    # a low lr keeps the teacher at its accuracy (5e-4 for 184 steps took it from 100% to 72%, 1e-4 to 92%, 5e-5
    # kept 100%); few student steps teach the spelling without making the student strong (SFT on references lifts it:
    # 300 steps at 5e-4 took 58% -> 86%; 60 at 3e-4 broke it, 7%; 150 at 3e-4 gave 40%: docs/FIDELITY.md)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-steps", type=int, default=150)
    ap.add_argument("--teacher-lr", type=float, default=5e-5)
    ap.add_argument("--student-lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--teacher-swap", type=float, default=0.1, help="share of hi-lo spellings in the teacher's data")
    ap.add_argument("--student-swap", type=float, default=0.9, help="share of hi-lo spellings in the student's data")
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="a few steps, 16 eval problems (tests)")
    args = ap.parse_args(argv)
    for key in ("teacher_swap", "student_swap"):
        if not 0 <= getattr(args, key) <= 1:
            raise SystemExit(f"--{key.replace('_', '-')}: must be in [0, 1], got {getattr(args, key)}")
    src = os.path.join(REPO, args.source)
    for role in ("teacher", "student"):
        if not os.path.isfile(os.path.join(src, role, "config.json")):
            raise SystemExit(f"--source: {os.path.join(args.source, role)} is no model dir (topd-ds make-models "
                             f"--task deque builds it)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from topd_ds.tasks.models import save_model
    from topd_ds.tasks import deque_alt as alt
    from topd_ds.tasks.make_models import train_supervised

    torch.manual_seed(0)
    if args.quick:
        args.seconds, args.n_eval = min(args.seconds, 20.0), min(args.n_eval, 16)
        args.teacher_steps, args.student_steps = min(args.teacher_steps, 3), min(args.student_steps, 3)
    out = os.path.join(REPO, args.out)
    tok = AutoTokenizer.from_pretrained(os.path.join(src, "tokenizer"))
    long = dict(min_items=11, max_items=11)
    # eval rows drawn with deque_alt's own eval seed stream; spelled 50/50 (references only: the metric is the sum)
    evals = alt.make_eval_set(args.n_eval, seed=7, p_swap=0.5, **long)
    stream = alt.train_stream(seed=7, exclude=evals, p_swap=0.5, **long)
    seen, train, val = set(), [], []
    for target, n in ((train, 2000), (val, 500)):
        while len(target) < (32 if args.quick else n):
            p = next(stream)
            if p.digits not in seen:
                seen.add(p.digits)
                target.append(p)
    tok.save_pretrained(os.path.join(out, "tokenizer"))
    for name, rows in (("train", train), ("val", val), ("eval", evals)):
        write_jsonl(os.path.join(out, "data", f"{name}.jsonl"), rows)

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "source": args.source, "n_eval": len(evals)}
    for role, swap, seed, steps, lr in (("teacher", args.teacher_swap, 1, args.teacher_steps, args.teacher_lr),
                                        ("student", args.student_swap, 2, args.student_steps, args.student_lr)):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(src, role)).float()
        before = alt.evaluate_greedy(model.eval(), tok, evals[:200])
        # all lengths, as the deque models were trained; excluding the eval and val rows
        data = alt.train_stream(seed=100 + seed, exclude=evals + val, p_swap=swap)
        t0 = time.monotonic()
        run = train_supervised(model, tok, data, seconds=args.seconds, max_steps=steps, lr=lr,
                               batch_size=args.batch_size, warmup=min(20, steps), log=print,
                               evaluate=alt.evaluate_greedy)
        res = alt.evaluate_greedy(model.eval(), tok, evals)
        print(f"{role}: swap {swap}: {run['steps']} steps in {run['seconds']} s; accuracy "
              f"{before['accuracy']:.3f} -> {res['accuracy']:.3f}, valid {res['exact_match']:.3f}, "
              f"hi-lo spelling {before['swap_rate']:.3f} -> {res['swap_rate']:.3f} ({time.monotonic() - t0:.0f} s)",
              flush=True)
        save_model(model, os.path.join(out, role), tok)
        report[role] = {"p_swap": swap, "steps": run["steps"], "seconds": run["seconds"], "lr": lr,
                        "final_loss": run["final_loss"], "before_on_200": before, **res}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
