"""`topd-ds sample`: the teacher's responses for stage 1, sampled offline into a JSONL file, resumably.

    topd-ds sample --config configs/qwen3_30b_a3b_to_4b/stage1_kd.yaml [key.path=value ...]
    topd-ds train  --config configs/qwen3_30b_a3b_to_4b/stage1_kd.yaml      # then reads that file

Paper Appendix B.1: the teacher samples one response per prompt (temperature 0.6, top_p 0.95) and stage 1
trains on them. Sampling 20k responses of up to 16k tokens takes hours; it runs here, before training, so that
no rank of a training job ever waits on the teacher inside a collective (docs/TRAINING.md, "Every rank in
step"). The teacher is the server the config names (teacher_server.urls) or a built-in one started here.

The file (data.responses, default run_dir/teacher_samples.jsonl) holds one record per line,
{"index", "prompt_ids", "response_ids", "finish_reason"}, for indices 0 .. kd.n_samples - 1 (prompt index
mod the number of prompts), in the order the responses arrive:
* each line is written whole with one write to a file opened O_APPEND, and the file is fsynced after every
  answered request: a killed run loses only the requests in flight, and at most its last line is torn;
* a restart cuts a torn last line off, keeps every complete line, and samples only the missing indices,
  so no index is ever written twice; an exclusive lock (FILE.lock) refuses a second sampler on the file;
* each response has its own seed, seeds.sample_seed(train.seed, KD_SAMPLE, 0, index): on a server that
  honours seeds a resumed file holds the same responses as an uninterrupted one.
"""

import argparse
import asyncio
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass

from topd_ds.errors import ConfigError, DataError, ServerError, TopdError

REQUEST_PROMPTS = 1  # prompts per generate request: one sample, so a request ends with its own sample (not the
                     # slowest of 8), progress moves per sample and a kill or timeout loses one sample's work
TIMEOUT_BASE_S = 120.0          # a request's timeout: this plus TIMEOUT_PER_TOKEN_S x kd.max_new_tokens; 16k
TIMEOUT_PER_TOKEN_S = 0.1       # tokens -> 1758 s: a sequence decoding at >= 10 tokens/s once it runs


@dataclass(frozen=True)
class RequestPlan:
    """How `topd-ds sample` talks to the teacher: samples in flight and each request's timeout, with why."""
    in_flight: int
    timeout_s: float
    why: str


def plan_requests(max_new_tokens: int, prompt_tokens: int, *, max_concurrency: int, timeout_s: float,
                  kv_tokens: list) -> RequestPlan:
    """Samples in flight and the per-request timeout for teacher samples of up to prompt_tokens + max_new_tokens.

    A request the server cannot start waits in its queue, and that wait counts against the request's timeout:
    so no more samples are in flight than the servers' KV caches hold at full length (kv_tokens: each server's
    token capacity, SGLang's max_total_num_tokens x dp_size from /get_server_info; None where unknown, e.g. the
    built-in server, which runs up to its --max-batch rows at once: then max_concurrency). The timeout grows with
    the length (TIMEOUT_BASE_S + TIMEOUT_PER_TOKEN_S per token), never below teacher_server.timeout_s.

    >>> plan_requests(16384, 800, max_concurrency=64, timeout_s=300, kv_tokens=[700_000]).in_flight
    40
    """
    per_sample = prompt_tokens + max_new_tokens
    timeout = max(float(timeout_s), TIMEOUT_BASE_S + TIMEOUT_PER_TOKEN_S * max_new_tokens)
    if kv_tokens and all(isinstance(k, int) and k > 0 for k in kv_tokens):
        fit = sum(max(1, k // per_sample) for k in kv_tokens)
        in_flight = min(max_concurrency, fit)
        why = (f"the teacher KV cache{'s' if len(kv_tokens) > 1 else ''} hold{'' if len(kv_tokens) > 1 else 's'} "
               f"{fit} samples of {prompt_tokens} + {max_new_tokens} tokens"
               + (f", teacher_server.max_concurrency {max_concurrency}" if fit > max_concurrency else ""))
    else:
        in_flight, why = max_concurrency, f"teacher_server.max_concurrency {max_concurrency}; no KV-cache size reported"
    return RequestPlan(in_flight, timeout, why)


async def kv_capacity(client) -> list:
    """Each server's KV-cache capacity in tokens (SGLang: max_total_num_tokens x dp_size), None where unknown."""
    async def one(url):
        try:
            info = await client.server_info(url)
        except ServerError:   # e.g. a router without the endpoint: sized from max_concurrency
            info = None
        kv = info.get("max_total_num_tokens") if isinstance(info, dict) else None
        dp = info.get("dp_size") if isinstance(info, dict) else None
        return kv * (dp if isinstance(dp, int) and dp > 0 else 1) if isinstance(kv, int) and kv > 0 else None
    return list(await asyncio.gather(*(one(u) for u in client.urls)))


def responses_path(cfg) -> str:
    return cfg.data.responses or os.path.join(cfg.run_dir, "teacher_samples.jsonl")


def read_records(path: str) -> tuple[list, int]:
    """(records of every complete line, byte length of those lines); a torn last line is left out."""
    if not os.path.exists(path):
        return [], 0
    with open(path, "rb") as f:
        data = f.read()
    keep = data[:data.rfind(b"\n") + 1]
    records = []
    for n, line in enumerate(keep.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            int(rec["index"]), list(rec["prompt_ids"]), list(rec["response_ids"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{n}: not a teacher-sample record ({err})") from None
        records.append(rec)
    return records, len(keep)


def records_by_index(records: list, path: str) -> dict:
    out = {}
    for rec in records:
        if rec["index"] in out:
            raise DataError(f"{path}: index {rec['index']} appears twice (two samplers wrote the file?)")
        out[rec["index"]] = rec
    return out


class ResponsesFile:
    """The responses JSONL opened for appending, under an exclusive lock; `done` maps index -> record."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.lock = open(path + ".lock", "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            raise TopdError(f"{path}: another `topd-ds sample` is writing it (lock {path}.lock)") from None
        records, length = read_records(path)
        if os.path.exists(path) and os.path.getsize(path) != length:
            with open(path, "r+b") as f:  # a torn last line from a killed run: cut, resampled below
                f.truncate(length)
        self.done = records_by_index(records, path)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, records: list):
        """One write per line (a kill tears at most the line being written), then fsync."""
        for rec in records:
            data = (json.dumps(rec) + "\n").encode("utf-8")
            while data:
                data = data[os.write(self.fd, data):]
            self.done[rec["index"]] = rec
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.lock.close()


async def sample_into(out: ResponsesFile, client, prompts, todo: list, params, *, run_seed: int, bar,
                      concurrency: int):
    """Sample the indices `todo` REQUEST_PROMPTS at a time, `concurrency` requests in flight; each answered
    request is appended at once and moves `bar` by its samples."""
    from topd_ds.rollout.seeds import KD_SAMPLE, sample_seed

    gate = asyncio.Semaphore(concurrency)

    async def request(idx):
        async with gate:
            batch = [prompts[i % len(prompts)] for i in idx]
            groups = await client.generate(batch, params, n=1,
                                           seeds=[[sample_seed(run_seed, KD_SAMPLE, 0, i)] for i in idx])
        out.append([{"index": i, "prompt_ids": list(p), "response_ids": g[0].output_ids,
                     "finish_reason": g[0].finish_reason} for i, p, g in zip(idx, batch, groups)])
        bar.update(len(idx))

    await asyncio.gather(*(request(todo[k:k + REQUEST_PROMPTS]) for k in range(0, len(todo), REQUEST_PROMPTS)))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="topd-ds sample", description="stage 1: sample the teacher's responses "
                                 "into data.responses (resumable; run it before `topd-ds train` with train.stage=kd)")
    ap.add_argument("--config", required=True, help="the stage-1 YAML config (see docs/CONFIG.md)")
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. kd.n_samples=1000")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from topd_ds.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.kd.source != "teacher":
        raise ConfigError(f"kd.source: is {cfg.kd.source!r}; stage 1 then trains on the data's own responses "
                          f"and there is nothing to sample")
    from tqdm import tqdm

    from topd_ds.data import open_prompt_set
    from topd_ds.engines.protocol import SamplingParams
    from topd_ds.data.tokenizers import load_tokenizers

    tokenizer = load_tokenizers(cfg)
    prompt_set = open_prompt_set(cfg.data.prompts, tokenizer, cfg.data)
    n_total = cfg.kd.n_samples or len(prompt_set)
    path = responses_path(cfg)
    out = ResponsesFile(path)
    try:
        todo = [i for i in range(n_total) if i not in out.done]
        print(f"topd-ds sample: {n_total} teacher responses into {path}: {n_total - len(todo)} there, "
              f"{len(todo)} to sample", flush=True)
        if not todo:
            return 0
        prompts = prompt_set.prompt_ids  # indexable prompt token ids, tokenised when drawn
        check_prompts_match(out.done, prompts, path, limit=cfg.data.check_rows)
        params = SamplingParams(max_new_tokens=cfg.kd.max_new_tokens, temperature=cfg.kd.sample_temperature,
                                top_p=cfg.kd.sample_top_p, stop_token_ids=(tokenizer.eos_token_id,))
        t0 = time.perf_counter()
        with teacher_urls(cfg) as urls, tqdm(total=n_total, initial=n_total - len(todo), unit="resp",
                                             dynamic_ncols=True, desc="teacher samples") as bar:
            asyncio.run(_sample(cfg, urls, out, prompts, todo, params, bar))
        print(f"topd-ds sample: done, {n_total} responses in {path} ({time.perf_counter() - t0:.0f}s)", flush=True)
        return 0
    finally:
        out.close()


async def _sample(cfg, urls, out, prompts, todo, params, bar):
    from topd_ds.engines.sglang import SGLangClient

    s = cfg.teacher_server
    key = s.api_key or os.environ.get("TOPD_API_KEY")
    probe = SGLangClient(urls, api_key=key, max_retries=s.max_retries, router=s.router)
    try:
        plan = plan_requests(cfg.kd.max_new_tokens, cfg.data.max_prompt_tokens, max_concurrency=s.max_concurrency,
                             timeout_s=s.timeout_s, kv_tokens=await kv_capacity(probe))
    finally:
        await probe.close()
    bar.write(f"topd-ds sample: {REQUEST_PROMPTS} prompt per request, {plan.in_flight} in flight ({plan.why}), "
              f"timeout {plan.timeout_s:.0f} s per request (kd.max_new_tokens {cfg.kd.max_new_tokens})")
    client = SGLangClient(urls, api_key=key, timeout_s=plan.timeout_s, max_retries=s.max_retries,
                          max_concurrency=plan.in_flight, router=s.router)
    try:
        await sample_into(out, client, prompts, todo, params, run_seed=cfg.train.seed, bar=bar,
                          concurrency=plan.in_flight)
    finally:
        await client.close()


class teacher_urls:
    """The configured teacher URLs, or a built-in teacher server started for the duration."""

    def __init__(self, cfg):
        self.cfg, self.proc = cfg, None

    def __enter__(self):
        s = self.cfg.teacher_server
        if s.urls:
            return list(s.urls)
        from topd_ds.engines.launch import launch_server

        self.proc = launch_server(self.cfg.model.teacher, device=s.device, api_key=s.api_key)
        print(f"topd-ds sample: started built-in teacher server at {self.proc.url}", flush=True)
        return [self.proc.url]

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.stop()


def check_prompts_match(done: dict, prompts, path: str, *, limit: int):
    """Records already in the file must have been sampled from these prompts (same data, template,
    tokenizer): up to `limit` of them, spread over the file, are compared with the prompt they name."""
    if not done:
        return
    indices = sorted(done)
    step = max(1, len(indices) // max(1, limit))
    for i in indices[::step]:
        if list(done[i]["prompt_ids"]) != list(prompts[i % len(prompts)]):
            raise DataError(f"{path}: record {i} was sampled from another prompt than data.prompts row "
                            f"{i % len(prompts)} (other data, template or tokenizer?); use a new data.responses")


def load_responses(cfg, prompts, *, config_path: str = "CONFIG.yaml") -> list:
    """The records 0 .. n_total - 1 of the responses file, in index order, for stage 1; one ConfigError
    naming the command to run when the file is missing or incomplete. Read-only: a torn last line (a sampler
    still running or killed) is ignored here."""
    n_total = cfg.kd.n_samples or len(prompts)
    path = responses_path(cfg)
    records, _ = read_records(path)
    done = {i: r for i, r in records_by_index(records, path).items() if i < n_total}
    if len(done) < n_total:
        raise ConfigError(responses_missing(path, len(done), n_total, config_path))
    check_prompts_match(done, prompts, path, limit=cfg.data.check_rows)
    return [done[i] for i in range(n_total)]


def responses_missing(path: str, have: int, need: int, config_path: str) -> str:
    what = "does not exist" if not os.path.exists(path) else f"holds {have} of the {need} responses"
    return (f"data.responses: {path} {what}; stage 1 trains on the teacher's responses: sample them first "
            f"with `topd-ds sample --config {config_path}` (it resumes where it stopped)")


def count_lines(path: str) -> int:
    """Complete lines of `path` (newline bytes), without parsing: the cheap check every rank can afford."""
    if not os.path.exists(path):
        return 0
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            n += block.count(b"\n")
    return n


if __name__ == "__main__":
    from topd_ds.cli import main as cli_main

    sys.exit(cli_main(["sample"] + sys.argv[1:]))
