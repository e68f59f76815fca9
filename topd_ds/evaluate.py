"""Accuracy through an inference server: pass@1 averaged over n samples per problem.

    topd-ds eval --model DIR --data eval.jsonl [--data aime24.parquet ...] [--n 5] [--temperature 0.6] [--out DIR]
    topd-ds eval --url http://127.0.0.1:30000 --tokenizer DIR --data ... [--prompt-suffix boxed]

Each set is a JSONL file, a Parquet file (or a folder of them) or a `datasets.save_to_disk` folder, read by the
training loader (topd_ds.data): the prompt from `prompt`/`problem`/`question`/`messages`/`conversations`, the
answer from `answer` or the last \\boxed{} of a `solution`; prompts go through the tokenizer's chat template
(`--chat-template`, `--system-prompt`, `--prompt-suffix`). A set is named by its file or folder name. A response is
right when its final answer equals the reference: the last `\\boxed{...}` if there is one (string equality, else
`math-verify`: 1/2 equals \\frac{1}{2}), otherwise the text after the last `=` (the arith task's checker).
pass@1 = mean over problems of the fraction of the n samples that are right; the table has one row per set and
their average. docs/EVAL.md: running AIME24/AIME25/HMMT25-Feb from local files.
"""

import argparse
import asyncio
import json
import os
import re
import statistics

from topd_ds.engines.protocol import SamplingParams

# Request timeout: a fixed part plus a budget per new token. One request carries up to 64 prompts x n samples,
# decoded together; 0.1 s/token (10 tokens/s per sequence) is slower than SGLang decodes a 4B model at that batch
# on one GPU, so a 32k-token AIME eval gets 600 + 3277 s instead of the 600 s that cut it off before.
EVAL_TIMEOUT_BASE_S = 600.0
EVAL_TIMEOUT_PER_TOKEN_S = 0.1


def eval_timeout_s(max_new_tokens: int) -> float:
    return EVAL_TIMEOUT_BASE_S + EVAL_TIMEOUT_PER_TOKEN_S * max_new_tokens

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def final_answer(text: str) -> str:
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    return text.strip().rsplit("=", 1)[-1].strip()


def is_correct(response: str, answer: str) -> bool:
    """Final answer of `response` equals `answer` (math-verify for LaTeX when installed)."""
    got = final_answer(response)
    if got.replace(" ", "") == str(answer).replace(" ", ""):
        return True
    if "\\boxed" in response:
        try:
            from math_verify import parse, verify
        except ImportError:
            return False
        return bool(verify(parse(f"${answer}$"), parse(f"${got}$")))
    return False


async def pass_at_1(client, prompts_ids, answers, decode, *, n: int = 1, temperature: float = 0.0,
                    top_p: float = 1.0, max_new_tokens: int = 256, eos_id=None, seed: int = 0) -> dict:
    """Mean over problems of the fraction of n samples that are correct; also per-problem scores."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop_token_ids=() if eos_id is None else (eos_id,), seed=seed)
    groups = await client.generate(prompts_ids, params, n=n)
    per_problem = []
    samples = []
    for group, answer in zip(groups, answers):
        texts = [decode(c.output_ids) for c in group]
        per_problem.append(sum(is_correct(t, answer) for t in texts) / len(texts))
        samples.append(texts[0])
    return {"pass@1": statistics.fmean(per_problem) if per_problem else 0.0, "n_problems": len(per_problem),
            "n_samples": n, "samples": samples, "per_problem": per_problem}


def answers_of(examples) -> list:
    """Reference answers; arith records carry `answer`, otherwise the value after the response's last '='."""
    out = []
    for ex in examples:
        if ex.answer is not None:
            out.append(ex.answer)
        elif ex.raw.get("response"):
            out.append(final_answer(ex.raw["response"]))
        else:
            out.append(None)
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="topd-ds eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model dir served by a built-in server started for this run")
    ap.add_argument("--url", help="an already running server (SGLang or topd-ds serve)")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: --model)")
    ap.add_argument("--api-key", default=os.environ.get("TOPD_API_KEY"), help="bearer token of --url")
    ap.add_argument("--data", action="append", required=True,
                    help="a set with problems and answers (.jsonl, .parquet, a folder); repeat for several sets")
    ap.add_argument("--n", type=int, default=5, help="samples per problem (paper: 5)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat-template", default="auto",
                    help="auto (the tokenizer's own), none (plain text), or a Jinja template / .jinja file")
    ap.add_argument("--system-prompt", default=None, help="system turn for problems that have none")
    ap.add_argument("--prompt-suffix", default="",
                    help="appended to each problem; 'boxed' = the paper's \\boxed{} instruction (docs/EVAL.md)")
    ap.add_argument("--prompt-template", default="{prompt}", help="wraps each problem; {prompt} is replaced")
    ap.add_argument("--enable-thinking", choices=("true", "false"), default=None,
                    help="passed to the chat template (Qwen3 hybrid models)")
    ap.add_argument("--field", action="append", default=[], metavar="ROLE=COLUMN",
                    help="column of another name, e.g. --field prompt=Question --field answer=Answer")
    ap.add_argument("--timeout-s", type=float, default=None,
                    help=f"per-request timeout (default {EVAL_TIMEOUT_BASE_S:.0f} + "
                         f"{EVAL_TIMEOUT_PER_TOKEN_S} x --max-new-tokens)")
    ap.add_argument("--out", help="folder for eval.json, samples.jsonl and TensorBoard events (tb/)")
    ap.add_argument("--step", type=int, default=0, help="TensorBoard step of these numbers (e.g. a training step)")
    args = ap.parse_args(argv)
    if bool(args.model) == bool(args.url):
        ap.error("give exactly one of --model or --url")
    if args.url and not args.tokenizer:
        ap.error("--tokenizer: required with --url")
    if args.n < 1:
        ap.error("--n: must be >= 1")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens: must be >= 1")
    args.fields = {}
    for item in args.field:
        role, sep, column = item.partition("=")
        if not sep:
            ap.error(f"--field: expected ROLE=COLUMN, got {item!r}")
        args.fields[role] = column
    if args.timeout_s is None:
        args.timeout_s = eval_timeout_s(args.max_new_tokens)
    return args


def set_name(path: str) -> str:
    """aime24.jsonl -> aime24, data/hmmt/ -> hmmt."""
    base = os.path.basename(os.path.normpath(path))
    return base.split(".")[0] if not os.path.isdir(path) else base


def load_sets(paths, tokenizer, fmt, fields=None) -> dict:
    """{set name: examples}, every row of every set checked (and answers required) before any server starts."""
    from topd_ds.data import PromptSet
    from topd_ds.data.fields import check_mapping
    from topd_ds.errors import DataError

    check_mapping(fields or {}, "--field")
    sets = {}
    for path in paths:
        name = set_name(path)
        if name in sets:
            raise DataError(f"{path}: a second set named {name!r} (file names must differ)")
        examples = list(PromptSet.open(path, tokenizer, fmt, key="--", max_prompt_tokens=10**9, fields=fields))
        missing = [i for i, a in enumerate(answers_of(examples)) if a is None]
        if missing:
            raise DataError(f"{path}: example {missing[0] + 1} has no 'answer' (nor a response to take it from)")
        sets[name] = examples
    return sets


def write_outputs(out: str, table: dict, samples: dict, step: int):
    from torch.utils.tensorboard import SummaryWriter

    from topd_ds.checkpoint import write_json_atomic

    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "eval.json"), table)
    tmp = os.path.join(out, "samples.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for name, rows in samples.items():
            for row in rows:
                f.write(json.dumps({"set": name, **row}) + "\n")
    os.replace(tmp, os.path.join(out, "samples.jsonl"))
    with SummaryWriter(os.path.join(out, "tb")) as writer:
        for name, row in table.items():
            writer.add_scalar(f"eval/{name}/pass@1", row["pass@1"], step)


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from topd_ds.engines.launch import launch_server
    from topd_ds.engines.sglang import SGLangClient

    from topd_ds.data import PromptFormat

    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    fmt = PromptFormat(chat_template=args.chat_template, system_prompt=args.system_prompt,
                       prompt_suffix=args.prompt_suffix, prompt_template=args.prompt_template,
                       enable_thinking=None if args.enable_thinking is None else args.enable_thinking == "true")
    sets = load_sets(args.data, tokenizer, fmt, args.fields)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    async def run(url):
        client = SGLangClient([url], api_key=args.api_key, timeout_s=args.timeout_s)
        try:
            table, samples = {}, {}
            for name, examples in sets.items():
                answers = answers_of(examples)
                r = await pass_at_1(client, [e.prompt_ids for e in examples], answers, decode, n=args.n,
                                    temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_token_id,
                                    seed=args.seed)
                table[name] = {"pass@1": r["pass@1"], "n_problems": r["n_problems"], "n_samples": args.n}
                samples[name] = [{"index": i, "answer": a, "score": sc, "response": t}
                                 for i, (a, sc, t) in enumerate(zip(answers, r["per_problem"], r["samples"]))]
            return table, samples
        finally:
            await client.close()

    if args.url:
        table, samples = asyncio.run(run(args.url))
    else:
        with launch_server(args.model) as server:
            table, samples = asyncio.run(run(server.url))
    table["average"] = {"pass@1": statistics.fmean(v["pass@1"] for v in table.values()), "n_sets": len(sets)}
    print(f"{'set':<24}{'problems':>9}{'pass@1 %':>10}   (n={args.n} samples/problem, T={args.temperature})")
    for name, row in table.items():
        print(f"{name:<24}{row.get('n_problems', ''):>9}{100 * row['pass@1']:>10.1f}")
    if args.out:
        write_outputs(args.out, table, samples, args.step)
        print(f"wrote {args.out}/eval.json, samples.jsonl, tb/")
    return 0
