"""The docs and the code tell one story: every config key, command flag, repository path and link the docs
name exists; every shipped YAML loads; every TensorBoard scalar the trainer writes is in docs/TRAINING.md.

Each check extracts names with an explicit pattern and compares them with the code (the config dataclasses,
the argparse parsers, the file tree, the trainer's sources). Prose that looks like a name but is not one goes
in an allow-list below with the reason. Runs in a few seconds (the parsers are built, nothing is trained).

    .venv/bin/python -m pytest -q tests/test_docs_consistency.py
"""

import argparse
import dataclasses
import glob
import importlib
import os
import re
import typing

import pytest
import yaml

from topd_ds.cli import COMMANDS
from topd_ds.config import Config, _resolve_relative, config_from_dict, resolve_deepspeed_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _where(rel, text, pos):
    return f"{rel}:{text.count(chr(10), 0, pos) + 1}"


# --------------------------------------------------------------------------------------------------
# Config keys: `section.field` with section a top-level key of Config (or a former one, so a stale key is
# caught), anywhere in the text; code references (module.function, a call, a file name) are told apart.

def _config_keys():
    """{section: {field names}} from the dataclasses (topd_ds/config.py)."""
    hints = typing.get_type_hints(Config)
    return {f.name: {g.name for g in dataclasses.fields(hints[f.name])} for f in dataclasses.fields(Config)}


# Former or easily confused section names: a key under one of these is stale (e.g. `server.timeout_s`, now
# student_server.* / teacher_server.*).
FORMER_SECTIONS = {"server", "student", "sampling", "loss", "losses", "sync", "eval"}
# A `section.word` whose word is one of these is a file name, not a key (`train.py`, `topd.yaml`).
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "jsonl", "md", "sh", "txt", "png", "parquet", "safetensors", "pt",
                 "bin", "log", "csv", "html", "jinja", "cfg", "toml"}
# `section.word` that is prose or code, not a key: add it here with the reason (none today; file names, calls
# `x.y(` and module attributes such as `train.ot_table` are told apart above without a list).
KEY_ALLOW = set()
KEY_RE = re.compile(r"(?<![\w./@-])([a-z_]+)\.([a-z_][a-z0-9_]*|\*(?!\*))(?![\w-]*\()")  # not **bold**


def _module_names(module):
    """Top-level defs / classes / assignments of every topd_ds/**/<module>.py (empty when there is none)."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "topd_ds", "**", f"{module}.py"), recursive=True):
        found = re.findall(r"^(?:def|class|async def)\s+(\w+)|^(\w+)\s*=", _read(os.path.relpath(path, ROOT)), re.M)
        names |= {a or b for a, b in found}
    return names


def stale_config_keys():
    keys = _config_keys()
    problems = []
    for rel in DOCS:
        text = _read(rel)
        for m in KEY_RE.finditer(text):
            section, name = m.group(1), m.group(2)
            if section not in keys and section not in FORMER_SECTIONS:
                continue
            if name in FILE_SUFFIXES or f"{section}.{name}" in KEY_ALLOW:
                continue
            if name in _module_names(section):  # `train.ot_table`, `pipeline.teacher_logprobs_at`: code
                continue
            if section in keys and (name == "*" or name in keys[section]):
                continue
            problems.append(f"{_where(rel, text, m.start())}: `{section}.{name}` is not a config key")
        for m in re.finditer(r"<role>_server\.(\w+)", text):  # student_server.X and teacher_server.X
            if m.group(1) not in keys["student_server"]:
                problems.append(f"{_where(rel, text, m.start())}: `<role>_server.{m.group(1)}` is not a config key")
    return problems


def test_every_config_key_named_in_the_docs_exists():
    problems = stale_config_keys()
    assert not problems, "\n".join(problems)


def test_yaml_blocks_in_the_docs_use_real_keys():
    """```yaml blocks whose top-level keys are config sections: every nested key exists."""
    keys = _config_keys()
    problems = []
    for rel in DOCS:
        text = _read(rel)
        for m in re.finditer(r"```ya?ml\n(.*?)```", text, re.S):
            try:
                data = yaml.safe_load(m.group(1))
            except yaml.YAMLError:
                continue
            if not isinstance(data, dict) or not set(data) & set(keys):
                continue  # a ZeRO JSON or another file's YAML
            for section, body in data.items():
                if section not in keys:
                    problems.append(f"{_where(rel, text, m.start())}: `{section}` is not a config section")
                    continue
                for name in (body or {}):
                    if name not in keys[section]:
                        problems.append(f"{_where(rel, text, m.start())}: `{section}.{name}` is not a config key")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# Commands and flags: `topd-ds CMD ... --flag` against the real argparse parsers; `scripts/X ... --flag`
# against the script's own source.

class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser(command):
    """The argparse parser of `topd-ds command`: its main() is run until it parses, then stopped there."""
    module = importlib.import_module(COMMANDS[command][0])

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(argparse.ArgumentParser, "parse_args", capture)
    mp.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    try:
        module.main([])
    except _Captured as c:
        return c.parser
    finally:
        mp.undo()
    raise AssertionError(f"topd-ds {command}: main() returned without parsing arguments")


def _command_lines():
    """(rel, text, pos, command line) for every `topd-ds ...` in inline code or a code block."""
    for rel in DOCS:
        text = _read(rel)
        blocks = [(m.start(1), m.group(1)) for m in re.finditer(r"```[^\n]*\n(.*?)```", text, re.S)]
        for start, span in blocks:
            span = re.sub(r"\\\n\s*", " ", span)  # a command continued with a backslash is one line
            for line in span.split("\n"):
                # a shell comment is prose ("topd-ds and deepspeed on PATH"), not a command
                yield rel, text, start + span.find(line), re.sub(r"(^|\s)#.*$", "", line)
        for m in re.finditer(r"(?<!`)`([^`\n]+)`(?!`)", text):
            yield rel, text, m.start(1), m.group(1)


def _segments(line, program):
    """The part of `line` after each `program` up to a shell separator or a comment."""
    for m in re.finditer(re.escape(program), line):
        if m.start() and not line[m.start() - 1] in " ([=\t/":  # `.venv/bin/topd-ds` too
            continue
        rest = re.split(r"\s(?:#|\||&&|;|&)\s?|\s&$|`", line[m.end():])[0]
        yield rest


def stale_command_flags():
    problems, parsers = [], {}
    for rel, text, pos, line in _command_lines():
        for rest in _segments(line, "topd-ds "):
            words = rest.split()
            if not words or words[0].startswith(("-", "<", "[")) or words[0] in ("CMD", "COMMAND"):
                continue
            cmd = words[0].rstrip(":,.")  # `topd-ds check: OK` is a line the command prints
            if cmd not in COMMANDS:
                problems.append(f"{_where(rel, text, pos)}: `topd-ds {cmd}` is not a command")
                continue
            if cmd not in parsers:
                parsers[cmd] = set(_parser(cmd)._option_string_actions)
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                if flag not in parsers[cmd]:
                    problems.append(f"{_where(rel, text, pos)}: `topd-ds {cmd} {flag}`: no such flag")
        for m in re.finditer(r"(?<![\w/.-])(scripts/[\w.-]+\.(?:py|sh))", line):
            path = m.group(1)
            if not os.path.isfile(os.path.join(ROOT, path)):
                continue  # reported by the path check
            source = _read(path)
            rest = next(_segments(line[m.start():], path), "")
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest.split(" -- ")[0]):
                if not re.search(rf"['\"(\s|]{re.escape(flag)}[\s'\")=|]", source):
                    problems.append(f"{_where(rel, text, pos)}: `{path} {flag}`: the script has no such flag")
    return problems


def stale_make_targets():
    targets = set(re.findall(r"^([\w-]+):", _read("Makefile"), re.M))
    problems = []
    for rel, text, pos, line in _command_lines():
        for rest in _segments(line, "make "):
            for word in rest.split():
                if word.startswith("-") or "=" in word:
                    continue
                if not re.fullmatch(r"[\w-]+", word) or word in targets:
                    continue
                problems.append(f"{_where(rel, text, pos)}: `make {word}` is not a Makefile target")
    return problems


def test_every_command_and_flag_named_in_the_docs_exists():
    problems = stale_command_flags() + stale_make_targets()
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# Paths and links: inside the repository, and there.

REPO_DIRS = ("topd_ds", "scripts", "configs", "ds_configs", "docs", "tests", "models")
PATH_RE = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./-]*)" % "|".join(REPO_DIRS))
LINK_RE = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
BARE_DOC_RE = re.compile(r"(?<![\w/.-])([A-Z][A-Z0-9_]+\.md)\b")
# Files outside the repository that the docs may name: none (whatever a user needs belongs in docs/).
OUTSIDE_RE = re.compile(r"\.\./shared|/work/shared|shared/notes")
# Paths that name something produced at run time or a placeholder, not a file in the tree.
PATH_ALLOW = (
    "models/qwen3.py",  # SGLang's python/sglang/srt/models/qwen3.py, in a list of upstream files read
    "docs/records/",    # written there by scripts/replicate.py and the fidelity campaign (docs/FIDELITY.md)
)


def _anchors(rel):
    """GitHub's heading anchors of a markdown file."""
    out = set()
    for h in re.findall(r"^#+\s+(.*)$", _read(rel), re.M):
        a = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        out.add(a)
    return out


def broken_paths():
    problems = []
    scripts = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "scripts", "*.*")))
    for rel in DOCS + ["setup.py", "Makefile", "requirements.txt"] + scripts:
        text = _read(rel)
        for m in OUTSIDE_RE.finditer(text):
            problems.append(f"{_where(rel, text, m.start())}: names a file outside the repository ({m.group(0)}...)")
        outputs = tuple(re.findall(r"--out\s+([\w./-]+)", text))  # written by a command the doc shows
        for m in (PATH_RE.finditer(text) if not rel.startswith("scripts/") else ()):  # scripts name outputs too
            path = m.group(1).rstrip(".,:;")
            placeholder = any(c in path for c in "*<>{}") or re.search(r"/(X|N|NAME|OUTNAME|DIR|FILE|my_\w*)\b", path)
            if placeholder or path.startswith(PATH_ALLOW) or (outputs and path.startswith(outputs)):
                continue
            if not os.path.exists(os.path.join(ROOT, path)):
                problems.append(f"{_where(rel, text, m.start())}: `{path}` does not exist in the repository")
        for m in BARE_DOC_RE.finditer(text):
            name = m.group(1)
            if not (os.path.isfile(os.path.join(ROOT, name)) or os.path.isfile(os.path.join(ROOT, "docs", name))):
                problems.append(f"{_where(rel, text, m.start())}: `{name}` is not in the repository")
        if not rel.endswith(".md"):
            continue
        for m in LINK_RE.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), file)) if file else \
                os.path.join(ROOT, rel)
            if not dest.startswith(ROOT + os.sep) or not os.path.exists(dest):
                problems.append(f"{_where(rel, text, m.start())}: link `{target}` does not resolve in the repository")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(os.path.relpath(dest, ROOT)):
                problems.append(f"{_where(rel, text, m.start())}: link `{target}`: no such heading")
    return problems


def test_every_path_and_link_resolves_inside_the_repository():
    problems = broken_paths()
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# Every shipped YAML loads (model and data paths aside: they exist only where the job runs).

YAMLS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"),
                                                             recursive=True))


@pytest.mark.parametrize("rel", YAMLS)
def test_every_shipped_yaml_loads(rel, monkeypatch):
    path = os.path.join(ROOT, rel)
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    monkeypatch.chdir(ROOT)  # relative paths in the configs are relative to the repository root (README)
    _resolve_relative(data, os.path.dirname(path))
    cfg = config_from_dict(data, check_paths=False)
    assert os.path.isfile(cfg.train.deepspeed_config), f"{rel}: train.deepspeed_config not found"
    # the qwen3 configs are laid out for 4 training ranks (README's real job), the CPU ones for 1 (or one
    # sequence-parallel group)
    world = 4 if "qwen3" in rel else cfg.train.sequence_parallel_size
    resolve_deepspeed_config(cfg, world_size=world, on_gpu="qwen3" in rel)


# --------------------------------------------------------------------------------------------------
# TensorBoard: every scalar the trainer writes has a row in docs/TRAINING.md's table, and every row is written.

# Every "group/name" string literal in the package is taken for a tag the trainer writes (train.log_step writes
# the loss terms, times, sync stats, procstat's and the batch's stats, eval_and_log the eval tags), except in the
# studies (their own TensorBoard dirs) and literals that are paths or MIME types.
TAG_RE = re.compile(r"[\"']([a-z_]+/[A-Za-z0-9_@.]+)[\"']")
NOT_TAGS = re.compile(r"^(configs|ds_configs|docs|scripts|tests|models|runs|application|text)/|\.(json|yaml|py|md)$")


def _stats_prefix():
    """train.log_step's rule for a batch.stats key's group (time/, pipeline/, ...), read from its source."""
    m = re.search(r"for k, v in batch\.stats\.items\(\):\n\s+prefix = (.+)\n", _read("topd_ds/train.py"))
    assert m, "topd_ds/train.py: log_step's `prefix = ...` rule for batch.stats not found; update this test"
    return eval("lambda k: " + m.group(1))  # noqa: S307 (the repository's own expression)


def written_tags():
    prefix = _stats_prefix()
    tags = set()
    for path in glob.glob(os.path.join(ROOT, "topd_ds", "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, ROOT)
        if rel.startswith(os.path.join("topd_ds", "studies")):
            continue
        source = _read(rel)
        tags |= {t for t in TAG_RE.findall(source) if not NOT_TAGS.search(t)}
        # batch.stats keys: train.log_step files them under a group by their name (_stats_prefix)
        for key in re.findall(r"\bstats\[\"(\w+)\"\]\s*\+?=", source):
            tags.add(f"{prefix(key)}/{key}")
    return tags


def documented_tags():
    text = _read("docs/TRAINING.md")
    table = re.search(r"^## TensorBoard[^\n]*\n\n?((?:\|.*\n)+)", text, re.M)
    assert table, "docs/TRAINING.md: no TensorBoard table"
    tags = set()
    for row in table.group(1).splitlines()[2:]:
        prefix = None
        for item in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if "/" in item:
                prefix = item.split("/")[0]
                tags.add(item)
            elif prefix:  # `time/rollout_s`, `scoring_s`: the prefix carries over
                tags.add(f"{prefix}/{item}")
    return tags


def test_every_tensorboard_tag_is_documented():
    missing = sorted(written_tags() - documented_tags())
    assert not missing, f"docs/TRAINING.md's TensorBoard table lacks {missing}"


def test_every_documented_tensorboard_tag_is_written():
    extra = sorted(documented_tags() - written_tags())
    assert not extra, f"docs/TRAINING.md's TensorBoard table names tags nothing writes: {extra}"


# --------------------------------------------------------------------------------------------------
# The GPU check's plan: docs/BENCHMARKS.md's step table and budget are the script's.

def test_device_check_steps_match_the_benchmarks_table():
    script = _read("scripts/device_check.sh")
    doc = _read("docs/BENCHMARKS.md")
    steps = {name: int(s) for name, s in re.findall(r"^\s*step (\w+) (\d+) ", script, re.M)}
    table = {name: int(s) for name, s in re.findall(r"^\| (\w+) \| (\d+) s \|", doc, re.M)}
    assert steps == table, f"scripts/device_check.sh steps {steps} != docs/BENCHMARKS.md table {table}"
    total = re.search(r"The timeouts add to (\d+) s against the (\d+) s budget", doc)
    assert total and int(total.group(1)) == sum(steps.values()), (total and total.group(0), sum(steps.values()))
    budget = re.search(r"^BUDGET_S=\$\{BUDGET_S:-(\d+)\}", script, re.M).group(1)
    assert total.group(2) == budget and f"BUDGET_S = {budget} s" in doc
