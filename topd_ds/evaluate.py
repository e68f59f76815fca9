"""Accuracy through an inference server: pass@1 averaged over n samples per problem.

    topd-ds eval --model DIR --data eval.jsonl [--data aime24.jsonl ...] [--n 5] [--temperature 0.6]
    topd-ds eval --url http://127.0.0.1:30000 --tokenizer DIR --data ...

Each JSONL line has a `"prompt"` and an `"answer"`. A response is right when its
final answer equals the reference: the last `\\boxed{...}` if there is one (checked by `math-verify` when it
is installed, else by normalised string equality), otherwise the text after the last `=` (the arith task).
"""

import argparse
import asyncio
import json
import os
import re
import statistics

from topd_ds.engines.protocol import SamplingParams

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
                    max_new_tokens: int = 256, eos_id=None, seed: int = 0) -> dict:
    """Mean over problems of the fraction of n samples that are correct; also per-problem scores."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_token_ids=() if eos_id is None else (eos_id,), seed=seed)
    groups = await client.generate(prompts_ids, params, n=n)
    per_problem = []
    samples = []
    for group, answer in zip(groups, answers):
        texts = [decode(c.output_ids) for c in group]
        per_problem.append(sum(is_correct(t, answer) for t in texts) / len(texts))
        samples.append(texts[0])
    return {"pass@1": statistics.fmean(per_problem) if per_problem else 0.0, "n_problems": len(per_problem),
            "n_samples": n, "samples": samples}


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


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from topd_ds.data import load_prompts
    from topd_ds.engines.launch import launch_server
    from topd_ds.engines.sglang import SGLangClient
    from topd_ds.errors import ConfigError

    ap = argparse.ArgumentParser(prog="topd-ds eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model dir served by a built-in server started for this run")
    ap.add_argument("--url", help="an already running server (SGLang or topd-ds serve)")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: --model)")
    ap.add_argument("--data", action="append", required=True, help="JSONL with prompt/problem and answer")
    ap.add_argument("--n", type=int, default=5, help="samples per problem (paper: 5)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prompt-template", default="{prompt}")
    ap.add_argument("--out", help="write the table as JSON here")
    args = ap.parse_args(argv)
    if bool(args.model) == bool(args.url):
        raise ConfigError("eval: give exactly one of --model or --url")
    tok_dir = args.tokenizer or args.model
    if not tok_dir:
        raise ConfigError("--tokenizer: required with --url")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    sets = {}
    for path in args.data:
        examples = load_prompts(path, tokenizer=tokenizer, max_prompt_tokens=10**6,
                                prompt_template=args.prompt_template)
        sets[os.path.splitext(os.path.basename(path))[0]] = examples

    async def run(url):
        client = SGLangClient([url])
        try:
            table = {}
            for name, examples in sets.items():
                r = await pass_at_1(client, [e.prompt_ids for e in examples], answers_of(examples),
                                    lambda ids: tokenizer.decode(ids, skip_special_tokens=True), n=args.n,
                                    temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                    eos_id=tokenizer.eos_token_id)
                table[name] = {k: v for k, v in r.items() if k != "samples"}
            return table
        finally:
            await client.close()

    if args.url:
        table = asyncio.run(run(args.url))
    else:
        with launch_server(args.model) as server:
            table = asyncio.run(run(server.url))
    table["average"] = {"pass@1": statistics.fmean(v["pass@1"] for v in table.values())}
    for name, row in table.items():
        print(f"{name:<20} pass@1 {100 * row['pass@1']:.1f}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=2)
        os.replace(tmp, args.out)
    return 0
