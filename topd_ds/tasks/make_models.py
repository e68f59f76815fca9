"""Build a built-in task's offline models: tokenizer, data, a trained teacher and a weak student.

    topd-ds make-models --out models/arith [--force] [--teacher-minutes 60] [--student-seconds 90] [--quick]
    topd-ds make-models --out models/arith --reuse-teacher --student-size 48x1   # rebuild only the student
    topd-ds make-models --task deque      # the deque task (docs/FIDELITY.md), into models/deque

Writes into `--out` (built in a temp dir beside it, then renamed; nothing half-written is left):

    tokenizer/          the character tokenizer (PreTrainedTokenizerFast)
    teacher/ student/   save_pretrained models (+ tokenizer), Llama architecture, tied embeddings
    data/train.jsonl    the first problems of the teacher's training stream (user data format)
    data/eval.jsonl     the held-out eval split (never trained on)
    report.json         sizes, train time and steps, greedy final-answer accuracy and exact match on eval

Both models are trained supervised on ground-truth traces (loss on response tokens only) with AdamW,
linear warm-up then cosine decay to 10% of the peak lr, gradient clipping at 1.0. The schedule's progress
is max(step / max_steps, elapsed / budget), so the lr reaches its floor when the time budget runs out
even on a busy machine. The teacher trains long enough to solve held-out problems well; the student is
small (capacity-limited) and trained briefly, so it starts weak but learnable. `--quick` makes tiny
models in seconds (for tests).
"""

import argparse
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time

from topd_ds.errors import ConfigError

# name: (hidden, layers, heads, peak lr). Sizes from the CPU probe (docs/ARITH.md).
SIZES = {
    "teacher": (128, 4, 4, 1.5e-3),
    "student": (32, 2, 4, 3e-3),
    "quick-teacher": (32, 1, 4, 3e-3),
    "quick-student": (16, 1, 2, 3e-3),
}
BATCH_SIZE = 64
WARMUP_STEPS = 100
MIN_LR_FRAC = 0.1
MAX_POSITIONS = 160  # prompt <= ~30 chars + response <= ~90 chars + specials


def lr_at(progress: float, step: int, *, peak: float, warmup: int, min_frac: float = MIN_LR_FRAC) -> float:
    """lr = peak * min(1, (step+1)/warmup) * (min_frac + (1-min_frac) * (1 + cos(pi * progress)) / 2)."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    cosine = min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return peak * warm * cosine


def make_batch(problems, tokenizer):
    """(input_ids, attention_mask, labels), each (B, T): <bos> prompt response <eos>, right padded.

    labels are -100 on the prompt and on padding, so the loss covers the response and <eos> only.
    """
    from topd_ds.data import pad_batch

    seqs, n_prompt = [], []
    for p in problems:
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(p.prompt, add_special_tokens=False)
        response = tokenizer.encode(p.response, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(prompt + response)
        n_prompt.append(len(prompt))
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, side="right")  # (B, T), (B, T)
    labels = ids.masked_fill(mask == 0, -100)
    for i, n in enumerate(n_prompt):
        labels[i, :n] = -100
    return ids, mask, labels


TASKS = ("arith", "deque")


def task_module(name: str):
    """The module of a built-in task: make_eval_set, train_stream, evaluate_greedy, ALPHABET, MODEL_SIZES."""
    if name not in TASKS:
        raise ConfigError(f"--task: must be one of {TASKS}, got {name!r}")
    return importlib.import_module(f"topd_ds.tasks.{name}")


def train_supervised(model, tokenizer, stream, *, seconds: float, max_steps: int, lr: float,
                     batch_size: int = BATCH_SIZE, warmup: int = WARMUP_STEPS, eval_problems=(),
                     eval_every_s: float = 120.0, log=print, evaluate=None) -> dict:
    """Train `model` on ground-truth traces from `stream` until the step or time budget is spent.

    Returns {"steps", "seconds", "final_loss", "curve": [(seconds, step, accuracy, exact_match), ...]}.
    """
    import torch
    import torch.nn.functional as F

    evaluate_greedy = evaluate or task_module("arith").evaluate_greedy
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    start = time.monotonic()
    next_eval, curve, step, loss_ema = eval_every_s, [], 0, None
    while True:
        elapsed = time.monotonic() - start
        progress = max(step / max(max_steps, 1), elapsed / max(seconds, 1e-9))
        if progress >= 1.0:
            break
        if eval_problems and elapsed >= next_eval:
            res = evaluate_greedy(model, tokenizer, eval_problems, batch_size=128)
            curve.append((round(elapsed, 1), step, res["accuracy"], res["exact_match"]))
            log(f"  eval @ {elapsed:6.0f}s step {step}: accuracy {res['accuracy']:.3f} "
                f"exact {res['exact_match']:.3f} (n={res['n']})")
            next_eval = elapsed + eval_every_s
            model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, step, peak=lr, warmup=warmup)
        ids, mask, labels = make_batch([next(stream) for _ in range(batch_size)], tokenizer)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 100 == 0:
            log(f"  step {step} {time.monotonic() - start:6.0f}s loss {loss_ema:.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e}")
    model.eval()
    return {"steps": step, "seconds": round(time.monotonic() - start, 1),
            "final_loss": None if loss_ema is None else round(loss_ema, 4), "curve": curve}


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def build_one(role: str, size: tuple, tokenizer, stream, *, seconds: float, max_steps: int, seed: int,
              eval_problems, eval_every_s: float, log, task=None, batch_size: int = BATCH_SIZE) -> tuple:
    """Build, train and evaluate one model of `size` = (hidden, layers, heads, peak lr); -> (model, entry)."""
    from topd_ds.tasks.models import build_model

    task = task or task_module("arith")
    evaluate_greedy = task.evaluate_greedy

    hidden, layers, heads, lr = size
    model = build_model("llama", seed=seed, vocab_size=len(tokenizer), hidden=hidden, layers=layers,
                        heads=heads, max_positions=MAX_POSITIONS, pad_id=tokenizer.pad_token_id,
                        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{role}: llama {hidden} x {layers} ({n_params} params), lr {lr}, budget {seconds:.0f}s / {max_steps} steps")
    probe = eval_problems[:200]
    train = train_supervised(model, tokenizer, stream, seconds=seconds, max_steps=max_steps, lr=lr,
                             eval_problems=probe, eval_every_s=eval_every_s, log=log, evaluate=evaluate_greedy,
                             batch_size=batch_size)
    t0 = time.monotonic()
    res = evaluate_greedy(model, tokenizer, eval_problems, batch_size=128)
    log(f"{role}: eval accuracy {res['accuracy']:.3f}, exact match {res['exact_match']:.3f} on {res['n']} "
        f"held-out problems ({time.monotonic() - t0:.0f}s to evaluate)")
    entry = {"arch": "llama", "hidden": hidden, "layers": layers, "heads": heads, "intermediate": 3 * hidden,
             "params": n_params, "peak_lr": lr, "batch_size": batch_size, "warmup_steps": WARMUP_STEPS,
             "train_seconds": train["seconds"], "train_steps": train["steps"], "final_loss": train["final_loss"],
             "accuracy": res["accuracy"], "exact_match": res["exact_match"], "n_eval": res["n"],
             "curve_on_200_eval": train["curve"]}
    return model, entry


def adopt_student(path: str, tokenizer, evals, task, log) -> tuple:
    """(model, report entry) for `--student-from`: its own report's entry (when `path` is a make-models
    teacher/student dir) plus its accuracy on this eval set."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(f"--student-from: {path} has {model.config.vocab_size} token ids, the task needs "
                          f"{len(tokenizer)}")
    entry = {}
    report = os.path.join(os.path.dirname(os.path.abspath(path)), "report.json")
    if os.path.exists(report):
        with open(report) as f:
            entry = dict(json.load(f).get(os.path.basename(os.path.normpath(path)), {}))
    res = task.evaluate_greedy(model, tokenizer, evals, batch_size=128)
    log(f"student: from {path}, eval accuracy {res['accuracy']:.3f}, exact match {res['exact_match']:.3f}")
    entry.update(source=os.path.abspath(path), accuracy=res["accuracy"], exact_match=res["exact_match"],
                 n_eval=res["n"], params=sum(p.numel() for p in model.parameters()))
    return model, entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="topd-ds make-models", description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="arith", help=f"built-in task, one of {TASKS}")
    parser.add_argument("--out", default=None, help="output directory (default models/TASK)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--teacher-minutes", type=float, default=60.0, help="teacher time budget (minutes)")
    parser.add_argument("--teacher-steps", type=int, default=8000, help="teacher step budget")
    parser.add_argument("--student-seconds", type=float, default=90.0, help="student warm-start budget (s)")
    parser.add_argument("--student-steps", type=int, default=2000, help="student step budget")
    parser.add_argument("--student-size", default=None, metavar="HIDDENxLAYERS",
                        help="student size, e.g. 48x1 (default %dx%d)" % SIZES["student"][:2])
    parser.add_argument("--student-from", default=None, metavar="DIR",
                        help="take this trained model as the student (e.g. the teacher of a shorter run)")
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="keep the teacher (and its report entry) of an existing --out; rebuild the rest")
    parser.add_argument("--n-eval", type=int, default=1000, help="held-out eval problems")
    parser.add_argument("--n-train-file", type=int, default=10000, help="problems written to data/train.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sequences per training step")
    parser.add_argument("--quick", action="store_true", help="tiny models and data in seconds (tests)")
    args = parser.parse_args(argv)
    task = task_module(args.task)
    sizes = dict(SIZES, **getattr(task, "MODEL_SIZES", {}))
    args.out = args.out or f"models/{args.task}"
    for key in ("teacher_minutes", "student_seconds"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"--{key.replace('_', '-')}: must be > 0, got {getattr(args, key)}")
    for key in ("teacher_steps", "student_steps", "n_eval", "n_train_file", "batch_size"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
    student_size = sizes["student"]
    if args.student_size is not None:
        m = re.fullmatch(r"(\d+)x(\d+)", args.student_size)
        if not m or int(m[1]) % 4 or int(m[2]) < 1:
            raise ConfigError(f"--student-size: expected HIDDENxLAYERS with HIDDEN a multiple of 4, "
                              f"got {args.student_size!r}")
        student_size = (int(m[1]), int(m[2]), 4, sizes["student"][3])
    out = os.path.abspath(args.out)
    if args.student_from and not os.path.isfile(os.path.join(args.student_from, "config.json")):
        raise ConfigError(f"--student-from: {args.student_from} is no model dir (no config.json)")
    if args.reuse_teacher:
        for name in ("teacher", "report.json"):
            if not os.path.exists(os.path.join(out, name)):
                raise ConfigError(f"--reuse-teacher: {os.path.join(args.out, name)} does not exist")
    elif os.path.exists(out) and not args.force:
        raise ConfigError(f"--out: {args.out} exists; pass --force to rebuild it")

    import torch

    from topd_ds.tasks.models import save_model
    from topd_ds.tasks.arith import write_jsonl
    from topd_ds.tasks.chartok import ARITH_ALPHABET, build_char_tokenizer

    def log(msg):
        print(msg, flush=True)

    if threading.current_thread() is threading.main_thread():  # `kill` too removes the temp build dir
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    torch.manual_seed(args.seed)
    if args.quick:
        args.n_eval, args.n_train_file = min(args.n_eval, 16), min(args.n_train_file, 32)
        t_budget, t_steps, s_budget, s_steps = 60.0, 20, 60.0, 10
        t_size, eval_every = SIZES["quick-teacher"], 1e9
        student_size = SIZES["quick-student"] if args.student_size is None else student_size
    else:
        t_budget, t_steps = 60.0 * args.teacher_minutes, args.teacher_steps
        s_budget, s_steps = args.student_seconds, args.student_steps
        t_size, eval_every = sizes["teacher"], 180.0
    started = time.time()
    tokenizer = build_char_tokenizer(getattr(task, "ALPHABET", ARITH_ALPHABET))
    evals = task.make_eval_set(args.n_eval, seed=args.seed)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=os.path.dirname(out))
    try:
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        file_stream = task.train_stream(seed=args.seed, exclude=evals)
        write_jsonl(os.path.join(tmp, "data", "train.jsonl"), (next(file_stream) for _ in range(args.n_train_file)))
        write_jsonl(os.path.join(tmp, "data", "eval.jsonl"), evals)
        if args.reuse_teacher:
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(os.path.join(out, "teacher")).float().eval()
            with open(os.path.join(out, "report.json")) as f:
                old = json.load(f)
            if (old.get("seed"), old.get("n_eval")) != (args.seed, len(evals)):
                raise ConfigError(f"--reuse-teacher: {args.out} was built with seed={old.get('seed')}, "
                                  f"n_eval={old.get('n_eval')}; pass the same --seed and --n-eval")
            t_entry = dict(old["teacher"], command=old["teacher"].get("command", old.get("command")),
                           date=old["teacher"].get("date", old.get("date")))
            log(f"teacher: reused from {args.out} (accuracy {t_entry['accuracy']:.3f})")
        else:
            teacher, t_entry = build_one("teacher", t_size, tokenizer,
                                         task.train_stream(seed=args.seed, exclude=evals),
                                         seconds=t_budget, max_steps=t_steps, seed=args.seed + 1,
                                         eval_problems=evals, eval_every_s=eval_every, log=log, task=task,
                                         batch_size=args.batch_size)
        save_model(teacher, os.path.join(tmp, "teacher"), tokenizer)
        if args.student_from:  # a model trained elsewhere (e.g. a shorter teacher run): evaluated, not trained
            student, s_entry = adopt_student(args.student_from, tokenizer, evals, task, log)
        else:  # the student sees a different part of the stream (seed + 1): same distribution, no eval problems
            student, s_entry = build_one("student", student_size, tokenizer,
                                         task.train_stream(seed=args.seed + 1, exclude=evals),
                                         seconds=s_budget, max_steps=s_steps, seed=args.seed + 2,
                                         eval_problems=evals, eval_every_s=eval_every, log=log, task=task,
                                         batch_size=args.batch_size)
        save_model(student, os.path.join(tmp, "student"), tokenizer)
        report = {"task": args.task, "teacher": t_entry, "student": s_entry, "n_eval": len(evals), "seed": args.seed,
                  "quick": args.quick, "machine": _machine(),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                  "total_seconds": round(time.time() - started, 1),
                  "command": "topd-ds make-models " + " ".join(sys.argv[2:] if argv is None else argv)}
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}: teacher accuracy {t_entry['accuracy']:.3f}, student accuracy {s_entry['accuracy']:.3f}")
    return 0
