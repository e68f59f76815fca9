"""`topd-ds check`: what a run needs, checked in seconds before it spends GPU time.

    topd-ds check --config configs/qwen3_30b_a3b_to_4b/topd.yaml --world-size 4 [key.path=value ...]

Runs what can be run without a GPU and without loading a model: the config (load_config); the first rows of
the data through the chat template; every server in the config reachable, with the launch flags this config
needs (SGLang's /get_server_info: hidden states, tp/dp, chunked prefill, deterministic inference); the batch
arithmetic for the world size (config.resolve_deepspeed_config); the weight route's requirements (dp 1 per URL,
/dev/shm space, NCCL: weight_sync.route_problems / shm_problem); prompt + new tokens against each model's
positions and each server's context length; and the memory per rank of this config's shapes by
docs/SCALING.md's arithmetic (`memory_per_rank`).

Prints one line per problem (`error: KEY: ...`) and exits 1 on any; `note:` lines are advice that does not
stop a run; otherwise a short OK summary and exit 0. Roles without URLs (built-in servers the trainer starts)
are checked from their model directories, without starting a server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from topd_ds.shapes import GB, ModelShape, length_problems, length_uses, memory_per_rank, model_shape, run_shapes

PREVIEW_ROWS = 256            # rows whose templated prompt lengths are measured (the loader checks data.check_rows)
SERVER_TIMEOUT_S = 10.0       # each server's answer to the check's few GETs


# ---- the check ----------------------------------------------------------------------------------------------
class Report:
    """The lines of one check: errors (each a problem: exit 1), notes (advice), oks (the summary)."""

    def __init__(self):
        self.errors, self.notes, self.oks = [], [], []

    def error(self, line):
        self.errors.append(line)

    def note(self, line):
        self.notes.append(line)

    def ok(self, line):
        self.oks.append(line)


def check_batch(cfg, world: int, report: Report):
    """The ZeRO JSON resolved for `world` ranks, as the trainer resolves it (one error line if it cannot be)."""
    from topd_ds.config import resolve_deepspeed_config
    from topd_ds.errors import ConfigError

    sp = cfg.train.sequence_parallel_size
    try:
        ds = resolve_deepspeed_config(cfg, world_size=world, on_gpu=_has_gpu())
        report.ok(f"batch: {world} rank(s) x micro-batch {ds['train_micro_batch_size_per_gpu']} x accumulation "
                  f"{ds['gradient_accumulation_steps']}" + (f" / sequence parallel {sp}" if sp > 1 else "")
                  + f" = global batch {ds['train_batch_size']}")
        return ds
    except ConfigError as err:
        report.error(str(err))
        return None


def check_data(cfg, report: Report) -> int | None:
    """The prompts through the chat template (the loader checks data.check_rows rows); the longest prompt of
    the first PREVIEW_ROWS. None when the data cannot be read."""
    from topd_ds.data import open_prompt_set
    from topd_ds.errors import TopdError
    from topd_ds.data.tokenizers import load_tokenizers

    if not cfg.data.prompts:
        report.note("data.prompts: not set: no prompts checked, lengths not compared")
        return None
    try:
        tokenizer = load_tokenizers(cfg)
        need_response = cfg.train.stage == "kd" and cfg.kd.source == "dataset"
        ps = open_prompt_set(cfg.data.prompts, tokenizer, cfg.data, require_response=need_response)
        lengths = [len(ps[k].prompt_ids) for k in range(min(len(ps), PREVIEW_ROWS))]
        first = tokenizer.decode(ps[0].prompt_ids)
        if cfg.data.eval:
            open_prompt_set(cfg.data.eval, tokenizer, cfg.data, eval_set=True)
    except (TopdError, OSError) as err:
        report.error(str(err))
        return None
    report.ok(f"data: {ps.summary()}; longest of the first {len(lengths)}: {max(lengths)} tokens; row 0 "
              f"templated: {' '.join(first.split())[:120]!r}")
    return max(lengths)


async def server_facts(role: str, server_cfg, report: Report) -> list:
    """[(url, facts)] for a role's URLs: SGLang's /get_server_info or the built-in server's /model_info.
    An unreachable URL is an error line."""
    from topd_ds.engines.sglang import SGLangClient
    from topd_ds.errors import ServerError

    client = SGLangClient(server_cfg.urls, api_key=server_cfg.api_key or os.environ.get("TOPD_API_KEY"),
                          timeout_s=SERVER_TIMEOUT_S, max_retries=0, router=server_cfg.router)
    out = []
    try:
        for url in client.urls:
            try:
                info = await client.server_info(url)
                facts = {"kind": "sglang", **info} if info is not None else None
                if facts is None:
                    status, body = await client._request("GET", "/model_info", url=url, accept=(404,))
                    facts = {"kind": "built-in", **body} if status == 200 and isinstance(body, dict) else {"kind": "?"}
            except ServerError as err:
                report.error(f"{role}_server.urls: {url}: not reachable ({err})")
                continue
            out.append((url, facts))
    finally:
        await client.close()
    return out


def server_limit(facts: dict) -> int | None:
    """The longest prompt + generation a server takes: SGLang's context_length, the built-in max_positions."""
    for key in ("context_length", "max_positions"):
        if isinstance(facts.get(key), int) and facts[key] > 0:
            return facts[key]
    return None


def check_server_flags(cfg, role: str, facts: list, report: Report):
    """The launch flags this config needs of SGLang servers (the built-in server needs none)."""
    t = cfg.train
    hidden = (role == "teacher" and cfg.teacher.scoring == "server"
              and (cfg.opd.estimator == "full" if t.stage == "opd" else cfg.kd.kd_ratio > 0))
    seeded = t.stage == "opd" or (role == "teacher" and cfg.kd.source == "teacher")
    for url, f in facts:
        if f.get("kind") != "sglang":
            continue
        if hidden and not f.get("enable_return_hidden_states"):
            report.error(f"{role}_server.urls: {url}: restart it with --enable-return-hidden-states (teacher.scoring "
                         f"server: the losses read the teacher's hidden states), or set teacher.scoring: local")
        chunk = f.get("chunked_prefill_size")
        if hidden and isinstance(chunk, int) and chunk > 0:
            report.note(f"{role}_server.urls: {url}: --chunked-prefill-size {chunk}: hidden states of longer sequences "
                        f"come in ceil(L / {chunk}) requests (docs/ENGINES.md); -1 sends each once")
        if seeded and not f.get("enable_deterministic_inference"):
            report.note(f"{role}_server.urls: {url}: no --enable-deterministic-inference: SGLang ignores the "
                        f"per-sample seeds, so a rebuilt batch or a resumed run samples differently")
        dp, tp = f.get("dp_size", 1), f.get("tp_size", 1)   # dp under an in-memory route: check_weight_route
        report.ok(f"{role} server {url}: SGLang {f.get('version', '?')}, tp {tp}, dp {dp}, context "
                  f"{server_limit(f)}")
    for url, f in facts:
        if f.get("kind") == "built-in":
            report.ok(f"{role} server {url}: built-in, {f.get('max_positions')} positions")


def check_weight_route(cfg, student: ModelShape, student_facts: list, report: Report):
    """The weight route's requirements (findings 2, 3, 6 of issue 24) through weight_sync's own checks:
    dp 1 per URL and one NCCL version for the in-memory routes (`route_problems`, from the student servers'
    /get_server_info), two model versions of room on /dev/shm for `tensor` (`shm_problem`)."""
    from topd_ds.comm.weight_sync import resolve_backend, route_problems, shm_problem, sync_root, trainer_nccl

    t = cfg.train
    model_bytes = 2 * student.n_params   # bf16 on GPUs; float32 CPU runs hold twice this
    backend = resolve_backend(t.weight_sync_backend)
    infos = {url: (f if f.get("kind") == "sglang" else None) for url, f in student_facts}
    problems = route_problems(t.weight_sync, backend, infos, trainer_nccl=trainer_nccl(),
                              server_nccl=t.weight_sync_nccl)
    if t.weight_sync == "tensor":
        problems.append(shm_problem(model_bytes))
    for line in filter(None, problems):
        report.error(line)
    if t.weight_sync == "disk":
        where = sync_root(t.sync_dir, cfg.run_dir, cfg.student_server.urls, model_bytes=model_bytes)
        report.ok(f"weight route: disk through {where}")
    else:
        report.ok(f"weight route: {t.weight_sync}" + (f" over {backend}" if t.weight_sync == "distributed" else ""))


def check_memory(cfg, prompt_tokens: int, world: int, student: ModelShape, teacher: ModelShape, budget_gb,
                 report: Report):
    shapes = run_shapes(cfg, prompt_tokens)
    mem = memory_per_rank(student, ranks=world, tokens=shapes["tokens"], chunk_size=cfg.opd.chunk_size,
                          dense_mask_tokens=shapes["dense_mask"], mask_rows=shapes["mask_rows"],
                          teacher_hidden_tokens=shapes["teacher_tokens"] if cfg.teacher.scoring == "server" else 0,
                          teacher_hidden_size=teacher.hidden,
                          teacher_params=teacher.n_params if cfg.teacher.scoring == "local" else 0,
                          checkpointing=cfg.model.gradient_checkpointing)
    top = sorted(((v, k) for k, v in mem.items() if k != "total"), reverse=True)[:3]
    line = (f"memory per rank: ~{_size(mem['total'])} at {shapes['tokens']} tokens per rank "
            f"({', '.join(f'{k} {_size(v)}' for v, k in top)}; docs/SCALING.md)")
    if budget_gb and mem["total"] > budget_gb * GB:
        report.error(f"{line} > {budget_gb:.0f} GB on the device: more ranks, train.sequence_parallel_size, "
                     f"shorter sequences or gradient checkpointing")
    else:
        report.ok(line)


def check(cfg, *, world: int, budget_gb: float | None = None) -> Report:
    """Every check of the module doc on a loaded config; the Report holds the lines."""
    from topd_ds.loss import sequence_parallel
    from topd_ds.errors import ConfigError

    report = Report()
    check_batch(cfg, world, report)
    try:
        sequence_parallel.check(cfg.model.student, cfg.train.sequence_parallel_size, world)
    except ConfigError as err:
        report.error(str(err))
    prompt_tokens = check_data(cfg, report)
    student, teacher = model_shape(cfg.model.student), model_shape(cfg.model.teacher)
    limits = {"student": (student.positions, f"max_position_embeddings of {cfg.model.student}"),
              "teacher": (teacher.positions, f"max_position_embeddings of {cfg.model.teacher}")}
    student_facts = []
    for role, server_cfg in (("student", cfg.student_server), ("teacher", cfg.teacher_server)):
        if not server_cfg.urls:
            report.ok(f"{role} server: built-in (started by the trainer; limits from model.{role})")
            continue
        facts = asyncio.run(server_facts(role, server_cfg, report))
        if role == "student":
            student_facts = facts
        check_server_flags(cfg, role, facts, report)
        served = [(server_limit(f), url) for url, f in facts if server_limit(f)]
        if served:
            n, url = min(served)
            limits[role] = (n, f"context length of {url}")
    if prompt_tokens is not None:
        for line in length_problems(length_uses(cfg), prompt_tokens, limits):
            report.error(line)
        cap, noted = cfg.data.max_prompt_tokens, set()
        for line in length_problems(length_uses(cfg), cap, limits):
            key = line.split(":", 1)[0]
            if not any(key == e.split(":", 1)[0] for e in report.errors) and key not in noted:
                noted.add(key)
                report.note(f"data.max_prompt_tokens {cap}: a prompt that long drawn later would not fit: {line}")
        check_memory(cfg, prompt_tokens, world, student, teacher, budget_gb, report)
    check_weight_route(cfg, student, student_facts, report)
    return report


def _size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_memory_gb():
    import torch

    return torch.cuda.get_device_properties(0).total_memory / GB if torch.cuda.is_available() else None


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="topd-ds check", description="check a config, its data, servers, batch "
                                 "arithmetic, weight route, lengths and memory before a run (one line per problem)")
    ap.add_argument("--config", required=True, help="the YAML config the run will use")
    ap.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                    help="training ranks the launcher will start (default: $WORLD_SIZE or 1)")
    ap.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="memory of one training GPU (default: the visible GPU's; none: not compared)")
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides, as given to `topd-ds train`")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from topd_ds.config import load_config
    from topd_ds.errors import ConfigError

    if args.world_size < 1:
        print("error: --world-size: must be >= 1", flush=True)
        return 1
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", flush=True)
        print("topd-ds check: 1 problem", flush=True)
        return 1
    report = check(cfg, world=args.world_size, budget_gb=args.gpu_memory_gb or _gpu_memory_gb())
    for line in report.errors:
        print(f"error: {line}", flush=True)
    for line in report.notes:
        print(f"note: {line}", flush=True)
    if report.errors:
        print(f"topd-ds check: {len(report.errors)} problem(s) in {args.config}", flush=True)
        return 1
    for line in report.oks:
        print(f"ok: {line}", flush=True)
    print(f"topd-ds check: OK ({args.config}, {cfg.train.stage}, {args.world_size} rank(s))", flush=True)
    return 0


if __name__ == "__main__":
    from topd_ds.cli import main as cli_main

    sys.exit(cli_main(["check"] + sys.argv[1:]))
