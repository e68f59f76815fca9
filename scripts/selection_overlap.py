"""How far `teacher.scoring: local`'s candidates differ from the hidden-state path's, on a task's own rollouts.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/selection_overlap.py [--config configs/deque/topd.yaml]
        [--prompts 64] [--ks 1,2,3,5,10,20] [--seed 0]

The student samples n_per_prompt rollouts per prompt (temperature 1, the config's max_new_tokens); both models
score them in float32 here (no server: the numbers the servers would answer). Per k, candidate selection
(pipeline.selection_score, the config's candidate_fraction per sequence, divergence.select_candidates) from
  exact  the teacher's logprobs at the student's top-k ids from its full distribution (teacher.scoring server:
         hidden states -> lm_head)
  top-k  the same ids looked up in the teacher's top-k, floored at its k-th logprob (teacher.scoring local:
         selection.teacher_logprobs_from_topk)
and prints the overlap |exact & top-k| / |exact| of the candidate sets, and the fraction of (position, id) pairs
that fell back to the floor. k >= V gives overlap 1 by construction (tests/test_pipeline.py checks it through
the servers).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from topd_ds.rollout import divergence  # noqa: E402
from topd_ds.config import load_config  # noqa: E402
from topd_ds.rollout.pipeline import selection_score, stack_ragged  # noqa: E402
from topd_ds.rollout.selection import teacher_logprobs_from_topk  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/deque/topd.yaml")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--ks", default="1,2,3,5,10,20")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from topd_ds.data import open_prompt_set

    cfg = load_config(args.config)
    tok = AutoTokenizer.from_pretrained(cfg.model.student)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.model.teacher, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(cfg.model.student, dtype=torch.float32).eval()
    prompts = open_prompt_set(cfg.data.prompts, tok, cfg.data)
    torch.manual_seed(args.seed)
    t_lp, s_lp = [], []                                  # per rollout (R, V) logprobs at the response positions
    with torch.no_grad():
        for i in range(min(args.prompts, len(prompts.prompt_ids))):
            p = list(prompts.prompt_ids[i])
            out = student.generate(torch.tensor([p]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   max_new_tokens=cfg.rollout.max_new_tokens, num_return_sequences=cfg.rollout.n_per_prompt,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for row in out.tolist():
                seq = p + [t for t in row[len(p):]]
                if tok.eos_token_id in seq[len(p):]:
                    seq = seq[:len(p) + seq[len(p):].index(tok.eos_token_id) + 1]
                ids = torch.tensor([seq])
                sl = slice(len(p) - 1, len(seq) - 1)     # rows predicting the response
                t_lp.append(torch.log_softmax(teacher(ids).logits[0, sl].double(), -1))
                s_lp.append(torch.log_softmax(student(ids).logits[0, sl].double(), -1))
    V = t_lp[0].shape[-1]
    n_pos = sum(len(x) for x in t_lp)
    print(f"{args.config}: {len(t_lp)} rollouts, {n_pos} response positions, V = {V}, "
          f"candidate_fraction {cfg.topd.candidate_fraction}, seed {args.seed}")
    print("| k | candidates (exact) | overlap | student ids floored |\n|---|---|---|---|")
    for k in [int(x) for x in args.ks.split(",")] + [V]:
        exact, approx, floored, total = [], [], 0, 0
        for tl, sl in zip(t_lp, s_lp):
            s_val, s_ids = sl.topk(min(k, V), -1)                                   # (R, k)
            exact.append(selection_score(s_ids, s_val, tl.gather(-1, s_ids)))
            t_val, t_ids = tl.topk(min(k, V), -1)
            approx.append(selection_score(s_ids, s_val, teacher_logprobs_from_topk(s_ids, t_ids, t_val)))
            floored += int((s_ids.unsqueeze(-1) != t_ids.unsqueeze(-2)).all(-1).sum())
            total += s_ids.numel()
        sets = []
        for scores in (exact, approx):
            sc, mask = stack_ragged([s.float() for s in scores])
            gen = torch.Generator().manual_seed(args.seed)
            sets.append(divergence.select_candidates(sc, mask, fraction=cfg.topd.candidate_fraction, mode="high",
                                                     generator=gen))
        n = int(sets[0].sum())
        both = int((sets[0] & sets[1]).sum())
        print(f"| {min(k, V)} | {n} | {both / max(n, 1):.3f} | {floored / total:.3f} |")


if __name__ == "__main__":
    main()
