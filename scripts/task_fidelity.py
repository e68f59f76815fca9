"""Measure the deque task's properties (docs/FIDELITY.md): accuracy, drift, multimodality, token labels.

    .venv/bin/python scripts/task_fidelity.py --models models/deque [--student DIR] [--n 500] [--out FILE.json]

For the teacher and the student (default models/deque/{teacher,student}; `--student` measures another one,
e.g. a run's final weights), on the first `--n` held-out problems:
* greedy final-answer accuracy and valid-derivation rate, overall and by number of digits (trace length);
* the student's first-error kinds (`deque.classify_error`: repeat / skip are drift);
* per-step accuracy on its own greedy prefixes (the step is valid given that every earlier step was) vs on
  teacher-forced prefixes (the reference trace; every token of the step is the argmax of a valid set), by step;
* multimodality: the share of the teacher's positions (on reference traces) with >= 2 next tokens of
  probability >= 0.2, overall and at tag positions (the choice points);
* labels of the student's temperature-1 samples: the teacher's choice (the teacher's argmax), a benign
  alternative (valid per the checker, not the teacher's argmax) or an error (the first invalid token;
  later tokens are not labelled).
"""

import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from topd_ds.data import pad_batch  # noqa: E402
from topd_ds.tasks import deque  # noqa: E402
from topd_ds.tasks.arith import generate_greedy  # noqa: E402


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).float().eval(), AutoTokenizer.from_pretrained(path)


def forward_probs(model, tok, prompts, responses, batch_size=64):
    """Per problem: (next-token probs at each response position (R+1, V), the response ids incl. <eos>)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs, spans = [], []
        for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size]):
            pids = [tok.bos_token_id] + tok.encode(p, add_special_tokens=False)
            rids = tok.encode(r, add_special_tokens=False) + [tok.eos_token_id]
            seqs.append(pids + rids)
            spans.append((len(pids), rids))
        ids, mask = pad_batch(seqs, tok.pad_token_id, side="right")  # (B, T)
        with torch.no_grad():
            probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)  # (B, T, V)
        for b, (n_p, rids) in enumerate(spans):
            out.append((probs[b, n_p - 1:n_p - 1 + len(rids)], rids))  # position j predicts response token j
    return out


def char_of(tok, tid):
    return deque.EOS if tid == tok.eos_token_id else tok.convert_ids_to_tokens(tid)


def by_length(problems, flags):
    groups = collections.defaultdict(list)
    for p, f in zip(problems, flags):
        groups[len(p.digits)].append(f)
    return {n: round(statistics.fmean(v), 4) for n, v in sorted(groups.items())}


def greedy_report(model, tok, problems):
    prompts = [p.prompt for p in problems]
    resp = generate_greedy(model, tok, prompts, max_new_tokens=deque.MAX_NEW_TOKENS)
    acc = [deque.check_answer(p, r) for p, r in zip(prompts, resp)]
    valid = [deque.is_valid_trace(p, r) for p, r in zip(prompts, resp)]
    kinds = collections.Counter(deque.classify_error(p, r) for p, r in zip(prompts, resp))
    return resp, {"accuracy": statistics.fmean(acc), "valid_trace": statistics.fmean(valid),
                  "accuracy_by_n_digits": by_length(problems, acc), "valid_by_n_digits": by_length(problems, valid),
                  "first_error_kinds": dict(kinds.most_common())}


def own_prefix_steps(problems, responses):
    """Per step index: P(step valid | every earlier step valid) on the model's own greedy traces."""
    ok, tried = collections.Counter(), collections.Counter()
    for p, r in zip(problems, responses):
        k = deque.first_error(p.prompt, r)
        steps = r.split(",")
        pos = 0
        for j, step in enumerate(steps[:len(p.digits)]):
            end = pos + len(step)  # the step's characters, then ',' or the end
            tried[j] += 1
            if k is None or k > end:  # an error at `end` is a wrong ',' / <eos> after the step
                ok[j] += 1
            else:
                break
            pos = end + 1
    return {j: round(ok[j] / tried[j], 4) for j in sorted(tried)}


def forced_steps(model, tok, problems):
    """Per step index: every token of the step (and its ',' or <eos>) is the model's argmax and valid,
    on the reference prefix."""
    ok, tried = collections.Counter(), collections.Counter()
    probs = forward_probs(model, tok, [p.prompt for p in problems], [p.response for p in problems])
    for p, (pr, rids) in zip(problems, probs):
        arg = pr.argmax(-1).tolist()
        text = p.response
        step, good = 0, True
        for j in range(len(rids)):
            allowed = deque.valid_next(p.prompt, text[:j])
            good &= char_of(tok, arg[j]) in allowed
            if j == len(text) or text[j] == ",":
                tried[step] += 1
                ok[step] += good
                step, good = step + 1, True
    return {j: round(ok[j] / tried[j], 4) for j in sorted(tried)}


def multimodality(teacher, tok, problems):
    probs = forward_probs(teacher, tok, [p.prompt for p in problems], [p.response for p in problems])
    n_all = n_multi = n_tag = n_tag_multi = 0
    tag_top2 = []
    for p, (pr, rids) in zip(problems, probs):
        for j in range(len(rids)):
            multi = int((pr[j] >= 0.2).sum()) >= 2
            n_all += 1
            n_multi += multi
            allowed = deque.valid_next(p.prompt, p.response[:j])
            if len(allowed) == 2 and allowed <= set(deque.TAGS):  # a real choice between the two ends
                n_tag += 1
                n_tag_multi += multi
                ids = [tok.convert_tokens_to_ids(c) for c in allowed]
                tag_top2.append(float(pr[j, ids].sum()))
    return {"positions": n_all, "share_multimodal": round(n_multi / n_all, 4), "choice_positions": n_tag,
            "share_multimodal_at_choices": round(n_tag_multi / max(n_tag, 1), 4),
            "mean_prob_on_both_ends_at_choices": round(statistics.fmean(tag_top2), 4) if tag_top2 else None}


def sample_labels(student, teacher, tok, problems, n_per=1, seed=0):
    """Labels of the student's temperature-1 tokens against the checker and the teacher's argmax."""
    torch.manual_seed(seed)
    prompts = [p.prompt for p in problems for _ in range(n_per)]
    responses = []
    for i in range(0, len(prompts), 128):
        chunk = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) for t in prompts[i:i + 128]]
        ids, mask = pad_batch(chunk, tok.pad_token_id, side="left")
        with torch.no_grad():
            out = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=deque.MAX_NEW_TOKENS,
                                   do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        responses += tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    probs = forward_probs(teacher, tok, prompts, responses)
    counts = collections.Counter()
    for prompt, r, (pr, rids) in zip(prompts, responses, probs):
        arg = pr.argmax(-1).tolist()
        for j in range(len(rids)):
            allowed = deque.valid_next(prompt, r[:j])
            ch = char_of(tok, rids[j])
            if ch not in allowed:
                counts["error"] += 1
                break
            counts["teacher_choice" if arg[j] == rids[j] else "benign"] += 1
    total = sum(counts.values())
    return {"samples": len(prompts), "tokens_labelled": total,
            "share": {k: round(v / total, 4) for k, v in sorted(counts.items())},
            "sample_accuracy": round(statistics.fmean(deque.check_answer(p, r) for p, r in zip(prompts, responses)), 4),
            "sample_valid": round(statistics.fmean(deque.is_valid_trace(p, r) for p, r in zip(prompts, responses)), 4)}


def markdown(report) -> str:
    """The report as the tables of docs/FIDELITY.md."""
    t, s = report["teacher"], report["student"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"Greedy, first {report['n']} held-out problems:", "",
             "| | final-answer accuracy | valid derivation | " +
             " | ".join(f"accuracy, {n} digits" for n in t["accuracy_by_n_digits"]) + " |",
             "|---|---|---|" + "---|" * len(t["accuracy_by_n_digits"])]
    for name, r in (("teacher", t), ("student", s)):
        lines.append(f"| {name} | {pct(r['accuracy'])} | {pct(r['valid_trace'])} | " +
                     " | ".join(pct(v) for v in r["accuracy_by_n_digits"].values()) + " |")
    steps = list(s["own_prefix_step_accuracy"])
    lines += ["", "Per-step accuracy by step index (own greedy prefix: the step is valid given every earlier step "
              "was; teacher-forced: on the reference prefix):", "",
              "| step | " + " | ".join(str(int(k) + 1) for k in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, r in (("teacher", t), ("student", s)):
        for kind in ("own_prefix_step_accuracy", "teacher_forced_step_accuracy"):
            label = f"{name}, {'own prefix' if kind.startswith('own') else 'teacher-forced'}"
            lines.append(f"| {label} | " + " | ".join(f"{100 * r[kind].get(k, float('nan')):.1f}" for k in steps) + " |")
    kinds = s["first_error_kinds"]
    lines += ["", "Student first-error kinds (greedy): " + ", ".join(f"{k} {v}" for k, v in kinds.items()),
              "Teacher first-error kinds (greedy): " + ", ".join(f"{k} {v}" for k, v in t["first_error_kinds"].items())]
    m, lab = report["teacher_multimodality"], report["student_sample_labels"]
    lines += ["", f"Teacher multimodality on the reference traces: {pct(m['share_multimodal'])} of {m['positions']} "
              f"positions have >= 2 next tokens of probability >= 0.2; at the {m['choice_positions']} choice points "
              f"(both ends valid) {pct(m['share_multimodal_at_choices'])}, with {pct(m['mean_prob_on_both_ends_at_choices'])} "
              f"of the mass on the two ends on average.",
              "", f"Student samples at temperature 1 ({lab['samples']}: {pct(lab['sample_accuracy'])} right, "
              f"{pct(lab['sample_valid'])} valid): of {lab['tokens_labelled']} labelled tokens " +
              ", ".join(f"{k} {pct(v)}" for k, v in lab["share"].items()) + "."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="models/deque")
    ap.add_argument("--student", default=None, help="student dir (default MODELS/student)")
    ap.add_argument("--n", type=int, default=500, help="held-out problems")
    ap.add_argument("--out", default=None, help="write the numbers here as JSON")
    ap.add_argument("--markdown", default=None, metavar="JSON", help="print the tables of a saved report and exit")
    args = ap.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return
    t0 = time.time()
    with open(os.path.join(args.models, "data", "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f][:args.n]
    problems = []
    for r in rows:  # the reference ends are read back from the stored trace
        digits = deque.digits_of(r["prompt"])
        ends, left = "", 0
        for step in r["response"].split(","):
            ends += "L" if deque.TAGS.index(step[0]) == left else "R"
            left += ends[-1] == "L"
        problems.append(deque.Problem(digits=digits, ends=ends))
    teacher, tok = load(os.path.join(args.models, "teacher"))
    student, _ = load(args.student or os.path.join(args.models, "student"))
    report = {"models": args.models, "student": args.student or os.path.join(args.models, "student"), "n": len(problems)}
    for name, model in (("teacher", teacher), ("student", student)):
        resp, rep = greedy_report(model, tok, problems)
        rep["own_prefix_step_accuracy"] = own_prefix_steps(problems, resp)
        rep["teacher_forced_step_accuracy"] = forced_steps(model, tok, problems)
        report[name] = rep
        print(name, json.dumps(rep), flush=True)
    report["teacher_multimodality"] = multimodality(teacher, tok, problems)
    print("multimodality", report["teacher_multimodality"], flush=True)
    report["student_sample_labels"] = sample_labels(student, teacher, tok, problems[:200], n_per=2)
    print("labels", report["student_sample_labels"], flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.out)
    print(markdown(report))
    print(f"done in {report['seconds']} s")


if __name__ == "__main__":
    main()
