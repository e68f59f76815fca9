"""docs/EVAL.md runs as written: every `topd-ds eval` command on the page is executed (issue 17), so the docs and
the code cannot drift. The Python snippet that saves the AIME/HMMT sets runs too, with `datasets.load_dataset`
replaced by small local tables (no hub here)."""

import json
import os
import re
import shlex

import pytest

from topd_ds import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "EVAL.md")
MAX_NEW_TOKENS = "12"   # a random tiny model rarely stops on its own: the only flag changed from the page


def blocks(lang: str) -> list:
    with open(DOC, encoding="utf-8") as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), flags=re.S)


def eval_commands() -> list:
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith(".venv/bin/topd-ds eval"):
                commands.append(shlex.split(line))
    return commands


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Qwen3 model with a Qwen3-style (ChatML) character tokenizer and its chat template."""
    from chat_tokenizers import build_chat_tokenizer

    from topd_ds.tasks.models import build_model, save_model

    tok = build_chat_tokenizer("qwen3")
    model = build_model("qwen3", seed=3, hidden=32, layers=1, heads=4, vocab_size=len(tok), pad_id=tok.pad_token_id,
                        bos_id=tok.eos_token_id, eos_id=tok.eos_token_id, max_positions=4096)
    return save_model(model, str(tmp_path_factory.mktemp("chat") / "model"), tok)


def test_every_documented_eval_command_runs(tmp_path, monkeypatch, tiny_models, chat_model):
    import datasets

    from topd_ds.engines.launch import launch_server

    commands = eval_commands()
    assert len(commands) == 3, "docs/EVAL.md: expected three eval commands; update this test with the page"
    monkeypatch.chdir(tmp_path)
    # the files the commands name, made here: the arith eval set (first rows) and, from the page's snippet, AIME/HMMT
    os.makedirs("models/arith/data")
    with open(os.path.join(REPO, "models/arith/data/eval.jsonl")) as src, open("models/arith/data/eval.jsonl", "w") as dst:
        dst.writelines(src.readlines()[:8])
    tables = {"HuggingFaceH4/aime_2024": [{"problem": "Find 2+3.", "answer": 5, "solution": "\\boxed{5}"}] * 3,
              "math-ai/aime25": [{"problem": "Find x if 2x=8.", "answer": "4"}] * 2,
              "MathArena/hmmt_feb_2025": [{"problem": "Compute 1/2.", "answer": "\\frac{1}{2}"}] * 2}
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split: datasets.Dataset.from_list(tables[repo]))
    (snippet,) = blocks("python")
    exec(compile(snippet, "docs/EVAL.md", "exec"), {})
    assert sorted(f for f in os.listdir(".") if f.endswith(".parquet")) == \
        ["aime24.parquet", "aime25.parquet", "hmmt25_feb.parquet"]

    server = launch_server(chat_model)
    try:
        swaps = {"runs/arith-topd/final": tiny_models[1], "http://127.0.0.1:30000": server.url,
                 "/models/Qwen3-4B-Instruct-2507": chat_model, "runs/qwen3-4b-topd/final": chat_model}
        for argv in commands:
            assert argv[:2] == [".venv/bin/topd-ds", "eval"]
            argv = [swaps.get(a, a) for a in argv[1:]] + ["--max-new-tokens", MAX_NEW_TOKENS]
            assert cli.main(argv) == 0, f"failed: {' '.join(argv)}"
    finally:
        server.stop()
    arith = json.load(open("runs/eval-topd/eval.json"))   # the AIME command's (the third has no --out)
    assert set(arith) == {"aime24", "aime25", "hmmt25_feb", "average"}
    assert [arith[k]["n_problems"] for k in ("aime24", "aime25", "hmmt25_feb")] == [3, 2, 2]


def test_the_documented_aime_prompt_is_chatml_with_the_boxed_instruction(chat_model, tmp_path):
    """What the AIME command sends: the tokenizer's ChatML, no <bos>, the paper's instruction after the problem."""
    from transformers import AutoTokenizer

    from topd_ds import evaluate
    from topd_ds.data import PromptFormat

    (tmp_path / "aime24.jsonl").write_text(json.dumps({"problem": "Find 2+3.", "answer": 5}) + "\n")
    aime = [a for a in eval_commands()[1][2:]]
    args = evaluate.parse_args(aime)
    assert args.prompt_suffix == "boxed" and args.timeout_s == 600 + 0.1 * 32768
    tok = AutoTokenizer.from_pretrained(chat_model)
    fmt = PromptFormat(chat_template=args.chat_template, system_prompt=args.system_prompt,
                       prompt_suffix=args.prompt_suffix, prompt_template=args.prompt_template)
    (ex,) = evaluate.load_sets([str(tmp_path / "aime24.jsonl")], tok, fmt)["aime24"]
    assert tok.decode(ex.prompt_ids) == ("<|im_start|>user\nFind 2+3.\nPlease reason step by step, and put your final "
                                         "answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert ex.answer == "5"
