"""Where OPD's signal sits on a deque student's own rollouts: before the trace's first error, at it, or after it.

    .venv/bin/python scripts/post_error_loss.py --config configs/deque-long/topd.yaml --out runs/studies/post-error \
        --batches 16 -- model.student=runs/deque-long-kd/final

A diagnostic for docs/FIDELITY.md (why 30 stage-2 steps lower the KD student's greedy pass@1): OPD trains every
response token of every rollout on the reverse KL to the teacher, KL(student || teacher) over the vocabulary at
that position. After a trace's first error (deque.first_error) the prefix is one the teacher never saw in training,
so its distribution there is no lesson about the task (`--task deque_alt` for that testbed's checker). The script
samples rollouts as training does (the config's servers, prompts and sampling), takes the teacher's full
distribution at every response position (its hidden states and head) and the student's (the model loaded here),
and splits tokens and the trainer's per-token loss (losses.reverse_kl_full) into: tokens of valid traces, tokens
before the first error of a wrong trace, the error token, tokens after it. Writes OUT/post_error.json.
"""

import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from topd_ds.checkpoint import write_json_atomic  # noqa: E402
from topd_ds.loss.losses import reverse_kl_full  # noqa: E402
from topd_ds.studies.filter_study import load_student  # noqa: E402
from topd_ds.studies.session import add_common_args, load_study_config, open_session  # noqa: E402
from topd_ds.tasks.oracle_cut import CHECKERS, first_error  # noqa: E402

PARTS = ("valid_trace", "before_error", "error_token", "after_error")


def parts_of(prompt: str, response: str, n_tokens: int, task: str = "deque") -> list:
    """The part (PARTS) of each of the n_tokens response tokens (one character each, then <eos>)."""
    e = first_error(prompt, response, task)
    if e is None:
        return ["valid_trace"] * n_tokens
    return ["before_error" if j < e else "error_token" if j == e else "after_error" for j in range(n_tokens)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--task", default="deque", choices=sorted(CHECKERS), help="the checker that finds the first error")
    args = ap.parse_args(argv)
    cfg = load_study_config(args)
    student = load_student(cfg.model.student)
    tokens = {p: 0 for p in PARTS}
    kl = {p: 0.0 for p in PARTS}
    n_traces = n_wrong = 0
    with open_session(cfg) as session:
        tok, head = session.tokenizer, session.teacher_head.double()
        for step in range(args.batches):
            batch = session.batch(step)
            for b, seq in enumerate(batch.sequences):
                s = batch.prompt_lens[b]
                resp = seq[s:]
                text = tok.decode([i for i in resp if i != tok.eos_token_id], skip_special_tokens=True)
                prompt = tok.decode(seq[:s], skip_special_tokens=True)
                with torch.no_grad():
                    logits_s = student(torch.tensor([seq])).logits[0, s - 1:len(seq) - 1]     # predicts resp[j]
                logits_t = batch.teacher_hidden[b][:len(resp)].double() @ head.T
                # the trainer's own per-token loss (opd.estimator full), in float64
                per_token = reverse_kl_full(logits_s[None].double(), logits_t[None],
                                            torch.ones(1, len(resp), dtype=torch.bool))[0].tolist()
                parts = parts_of(prompt, text, len(resp), args.task)
                n_traces += 1
                n_wrong += parts[0] != "valid_trace"
                for part, value in zip(parts, per_token):
                    tokens[part] += 1
                    kl[part] += value
            print(f"post-error: batch {step + 1}/{args.batches}", flush=True)
    total_t, total_kl = sum(tokens.values()), sum(kl.values())
    result = {"config": args.config, "task": args.task, "overrides": args.overrides, "batches": args.batches,
              "traces": n_traces, "wrong_traces": n_wrong, "tokens": tokens, "kl": kl,
              "token_share": {p: tokens[p] / total_t for p in PARTS},
              "kl_share": {p: kl[p] / total_kl for p in PARTS},
              "kl_per_token": {p: kl[p] / tokens[p] if tokens[p] else None for p in PARTS}}
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "post_error.json"), result)
    print(f"{n_traces} rollouts, {n_wrong} with an error ({100 * n_wrong / n_traces:.1f}%)\n")
    print("| part | tokens | share of tokens | share of OPD's loss (reverse KL) | KL per token (nats) |")
    print("|---|---|---|---|---|")
    for p in PARTS:
        per = result["kl_per_token"][p]
        print(f"| {p} | {tokens[p]} | {100 * result['token_share'][p]:.1f}% | {100 * result['kl_share'][p]:.1f}% | "
              f"{'-' if per is None else f'{per:.3f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
