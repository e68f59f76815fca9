"""`topd-ds serve`: a transformers model behind the subset of SGLang's native HTTP API we use.

    topd-ds serve --model DIR [--host 127.0.0.1] [--port 30000] [--device cpu|cuda]
                  [--dtype float32] [--api-key KEY] [--max-batch 64] [--batch-window-ms 5] [--no-hidden-states]

--no-hidden-states refuses return_hidden_states with a 400, as SGLang does without --enable-return-hidden-states
(a teacher server for `teacher.scoring: local`, which never asks for them; tests/test_pipeline.py).

Endpoints (same JSON shapes as SGLang 0.5.x; docs/ENGINES.md lists them):
    POST /generate                  {"input_ids": [..] | [[..], ..], "sampling_params": {..} | [..],
                                     "return_logprob", "logprob_start_len", "top_logprobs_num",
                                     "return_hidden_states", "hidden_states_encoding": "json" |
                                     "base64" (ours only: engines/tensor_codec.py), "return_flat_raw_top_logprobs",
                                     "return_flat_raw_top_logprobs_b64"}; a batch (or n > 1) answers a list,
                                     ordered prompt-major: item i * n + j is sample j of prompt i
    POST /update_weights_from_disk  {"model_path", "weight_version"} -> {"success", "message", ..}
    POST /init_weights_update_group, /destroy_weights_update_group, /begin_weight_update, /end_weight_update,
         /update_weights_from_distributed, /update_weights_from_tensor   the in-memory weight routes, SGLang
                                     0.5.23's bodies (weight_group.py; docs/ENGINES.md "Weight sync routes")
    POST /flush_cache               400 while requests are in flight (as SGLang), else 200
    GET  /health, /health_generate, /model_info (= /get_model_info), /get_weight_version

Concurrent /generate requests are collected until none arrived for `batch_window_ms` (at most
MAX_COLLECT_S, at most `max_batch` rows) and run as one left-padded batch on the single model worker
thread (`hf_engine.HFEngine`); weight updates run on that same thread, so they land between batches. Bad requests get a 4xx JSON error
{"error": {"message": ...}}; the server never dies on a request. SIGTERM shuts it down cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from aiohttp import web

from topd_ds.engines.hf_engine import HFEngine, Row

log = logging.getLogger("topd_ds.serve")

DEFAULT_PORT = 30000
DEFAULT_MAX_BATCH = 64
DEFAULT_BATCH_WINDOW_MS = 5.0
MAX_COLLECT_S = 0.25             # longest a request waits for others to join its batch
PARENT_POLL_S = 1.0              # --exit-with-parent: how often the parent is looked for
MAX_N = 256                      # samples per prompt we accept in one request
OPEN_PATHS = ("/health", "/health_generate")   # answered without the API key, as SGLang does
HIDDEN_ENCODINGS = ("json", "base64")          # hidden_states_encoding (tensor_codec); SGLang has json only


class BadRequest(ValueError):
    """The request is malformed; the message names the field."""


@dataclass
class Job:
    rows: list[Row]
    future: asyncio.Future = field(default=None)


def _int(value, name, *, lo=None, hi=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name}: expected an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"{name}: {value} outside [{lo}, {hi}]")
    return value


def _float(value, name) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _per_input(value, name, count):
    """SGLang accepts one value for the batch or one per input."""
    if isinstance(value, list):
        if len(value) != count:
            raise BadRequest(f"{name}: expected {count} entries (one per input), got {len(value)}")
        return value
    return [value] * count


def parse_generate(body, *, vocab_size: int, max_positions: int,
                   hidden_states: bool = True) -> tuple[list[Row], bool]:
    """A /generate JSON body -> (rows, single). Rows are prompt-major: row i * n + j. hidden_states False:
    return_hidden_states is refused (SGLang 0.5.23 without --enable-return-hidden-states)."""
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    if "input_ids" not in body:
        raise BadRequest("input_ids: missing (this server takes token ids, not text)")
    ids = body["input_ids"]
    single = isinstance(ids, list) and len(ids) > 0 and not isinstance(ids[0], list)
    prompts = [ids] if single else ids
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest("input_ids: expected a non-empty list of token ids or of lists of token ids")
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not p:
            raise BadRequest(f"input_ids[{i}]: expected a non-empty list of token ids")
        for t in p:
            _int(t, f"input_ids[{i}]", lo=0, hi=vocab_size - 1)
    B = len(prompts)
    sps = _per_input(body.get("sampling_params") or {}, "sampling_params", B)
    ret_lp = _per_input(body.get("return_logprob", False), "return_logprob", B)
    starts = _per_input(body.get("logprob_start_len", -1), "logprob_start_len", B)
    tops = _per_input(body.get("top_logprobs_num", 0), "top_logprobs_num", B)
    hidden = bool(body.get("return_hidden_states", False))
    encoding = body.get("hidden_states_encoding", "json")
    if encoding not in HIDDEN_ENCODINGS:
        raise BadRequest(f"hidden_states_encoding: expected one of {list(HIDDEN_ENCODINGS)}, got {encoding!r}")
    if hidden and not hidden_states:  # SGLang 0.5.23's words (tokenizer_manager.py, _validate_one_request)
        raise BadRequest("return_hidden_states: the server is not configured to return hidden states "
                         "(started with --no-hidden-states; SGLang: --enable-return-hidden-states)")
    flat = bool(body.get("return_flat_raw_top_logprobs", False))
    flat_b64 = bool(body.get("return_flat_raw_top_logprobs_b64", False))
    if flat_b64 and not flat:  # as SGLang's GenerateReqInput._validate_inputs
        raise BadRequest("return_flat_raw_top_logprobs_b64: requires return_flat_raw_top_logprobs")
    rows = []
    for i, (p, sp) in enumerate(zip(prompts, sps)):
        if not isinstance(sp, dict):
            raise BadRequest(f"sampling_params[{i}]: expected an object")
        unknown = set(sp) - {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "ignore_eos",
                             "n", "sampling_seed", "skip_special_tokens", "no_stop_trim"}
        if unknown:
            raise BadRequest(f"sampling_params.{sorted(unknown)[0]}: not supported by this server")
        n = _int(sp.get("n", 1), "sampling_params.n", lo=1, hi=MAX_N)
        max_new = _int(sp.get("max_new_tokens", 128), "sampling_params.max_new_tokens", lo=0)
        if len(p) + max_new > max_positions:
            raise BadRequest(f"input_ids[{i}]: {len(p)} + max_new_tokens {max_new} > max positions {max_positions}")
        temperature = _float(sp.get("temperature", 1.0), "sampling_params.temperature")
        top_p = _float(sp.get("top_p", 1.0), "sampling_params.top_p")
        top_k = _int(sp.get("top_k", -1), "sampling_params.top_k", lo=-1)
        if temperature < 0 or not 0 < top_p <= 1 or top_k == 0:
            raise BadRequest("sampling_params: need temperature >= 0, top_p in (0, 1], top_k -1 or >= 1")
        stops = sp.get("stop_token_ids") or []
        if not isinstance(stops, list):
            raise BadRequest("sampling_params.stop_token_ids: expected a list of token ids")
        stops = frozenset(_int(t, "sampling_params.stop_token_ids", lo=0, hi=vocab_size - 1) for t in stops)
        seed = sp.get("sampling_seed")
        seed = None if seed is None else _int(seed, "sampling_params.sampling_seed", lo=0)
        start = _int(starts[i], "logprob_start_len", lo=-1, hi=len(p) - 1)
        top = _int(tops[i], "top_logprobs_num", lo=0, hi=vocab_size)
        for j in range(n):
            rows.append(Row(input_ids=list(p), max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                            top_k=top_k, stop_token_ids=stops, ignore_eos=bool(sp.get("ignore_eos", False)),
                            seed=None if seed is None else seed + j, return_logprob=bool(ret_lp[i]),
                            logprob_start_len=start, top_logprobs_num=top, return_hidden_states=hidden,
                            hidden_states_encoding=encoding, flat_top_logprobs=flat, flat_top_logprobs_b64=flat_b64))
    return rows, single and len(rows) == 1


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


class Server:
    """HTTP front end: request parsing, the batching loop, and the single model worker thread."""

    def __init__(self, engine: HFEngine, *, api_key: str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, parent_pid: int | None = None,
                 hidden_states: bool = True):
        self.engine, self.api_key, self.parent_pid = engine, api_key, parent_pid
        self.hidden_states = hidden_states   # False: return_hidden_states is refused (--no-hidden-states)
        self.watch_task: asyncio.Task | None = None
        self.max_batch, self.window_s = max_batch, batch_window_ms / 1000.0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.queue: asyncio.Queue | None = None
        self.loop_task: asyncio.Task | None = None
        self.in_flight = 0
        self.session = False     # a weight-update session is open (/begin_weight_update, as SGLang 0.5.23)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=1 << 30)
        app.add_routes([
            web.post("/generate", self.generate), web.post("/update_weights_from_disk", self.update_weights),
            web.post("/flush_cache", self.flush_cache), web.get("/flush_cache", self.flush_cache),
            web.get("/health", self.health), web.get("/health_generate", self.health_generate),
            web.get("/model_info", self.model_info), web.get("/get_model_info", self.model_info),
            web.get("/get_weight_version", self.weight_version),
            web.post("/init_weights_update_group", self.init_group),
            web.post("/destroy_weights_update_group", self.destroy_group),
            web.post("/begin_weight_update", self.begin_update), web.post("/end_weight_update", self.end_update),
            web.post("/update_weights_from_distributed", self.update_from_distributed),
            web.post("/update_weights_from_tensor", self.update_from_tensor),
        ])
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    @web.middleware
    async def _auth(self, request, handler):
        if self.api_key and request.path not in OPEN_PATHS:
            if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
                return _error(401, "Authorization: missing or wrong Bearer api key")
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except BadRequest as err:
            return _error(400, str(err))
        except Exception as err:  # a bug or a model failure: answer 500, keep serving
            log.exception("request %s failed", request.path)
            return _error(500, f"{type(err).__name__}: {err}")

    async def _start(self, app):
        self.queue = asyncio.Queue()
        self.loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        if self.parent_pid is not None:
            self.watch_task = asyncio.get_running_loop().create_task(self._watch_parent())

    async def _watch_parent(self):
        """Exit (SIGTERM to ourselves, the clean path) once the launching process is gone, even if it
        was SIGKILLed and could run no cleanup: we are then re-parented and getppid() changes."""
        while os.getppid() == self.parent_pid:
            await asyncio.sleep(PARENT_POLL_S)
        log.warning("parent process %d is gone; shutting down", self.parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    async def _stop(self, app):
        if self.watch_task is not None:
            self.watch_task.cancel()
        self.loop_task.cancel()
        try:
            await self.loop_task
        except asyncio.CancelledError:
            pass
        self.worker.shutdown(wait=True, cancel_futures=True)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def _batch_loop(self):
        """Collect jobs until none arrived for window_s (at most MAX_COLLECT_S, at most max_batch rows),
        run them as one batch on the worker thread, scatter the answers."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            count, first = len(jobs[0].rows), loop.time()
            quiet_until = first + self.window_s
            while count < self.max_batch:
                left = min(quiet_until, first + MAX_COLLECT_S) - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                count += len(job.rows)
                quiet_until = loop.time() + self.window_s     # a burst is still arriving: keep collecting
            rows = [r for j in jobs for r in j.rows]
            try:
                answers = await self._run(self.engine.generate, rows)
            except Exception as err:
                log.exception("batch of %d rows failed", len(rows))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(err)
                continue
            for j in jobs:
                part, answers = answers[:len(j.rows)], answers[len(j.rows):]
                if not j.future.done():
                    j.future.set_result(part)

    async def _submit(self, rows: list[Row]) -> list[dict]:
        job = Job(rows, asyncio.get_running_loop().create_future())
        self.in_flight += 1
        try:
            await self.queue.put(job)
            return await job.future
        finally:
            self.in_flight -= 1

    async def _json(self, request):
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"body: not valid JSON ({err})") from err

    async def generate(self, request):
        rows, single = parse_generate(await self._json(request), vocab_size=self.engine.vocab_size,
                                      max_positions=self.engine.max_positions, hidden_states=self.hidden_states)
        answers = await self._submit(rows)
        return web.json_response(answers[0] if single else answers)

    async def update_weights(self, request):
        body = await self._json(request)
        if not isinstance(body, dict) or not isinstance(body.get("model_path"), str):
            raise BadRequest("model_path: missing or not a string")
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str):
            raise BadRequest("weight_version: expected a string")
        try:
            await self._run(self.engine.load_weights, body["model_path"], version)
        except Exception as err:  # same answer shape as SGLang: success false, HTTP 400, server stays up
            return web.json_response({"success": False, "message": f"Failed to update weights: {err}",
                                      "num_paused_requests": 0}, status=400)
        msg = "Succeeded to update model weights." + (f" Weight version updated to {version}." if version else "")
        return web.json_response({"success": True, "message": msg, "num_paused_requests": 0})

    # ---- in-memory weight routes: SGLang 0.5.23's request bodies (docs/ENGINES.md "Weight sync routes") ----
    @staticmethod
    def _ok(message: str, ok: bool = True) -> web.Response:
        return web.json_response({"success": ok, "message": message}, status=200 if ok else 400)

    async def init_group(self, request):
        body = await self._json(request)
        if not isinstance(body, dict):
            raise BadRequest("body: expected a JSON object")
        for key in ("master_address", "master_port", "rank_offset", "world_size"):
            if key not in body:
                raise BadRequest(f"{key}: missing")
        if not isinstance(body["master_address"], str) or not body["master_address"]:
            raise BadRequest("master_address: expected a host name or address")
        port = _int(body["master_port"], "master_port", lo=1, hi=65535)
        world = _int(body["world_size"], "world_size", lo=2)
        rank = _int(body["rank_offset"], "rank_offset", lo=1, hi=world - 1)
        group, backend = body.get("group_name", "weight_update_group"), body.get("backend", "nccl")
        if not isinstance(group, str) or not group:
            raise BadRequest("group_name: expected a non-empty string")
        if backend not in ("gloo", "nccl"):
            raise BadRequest(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl" and self.engine.device.type != "cuda":
            raise BadRequest("backend: nccl needs a server on a GPU (--device cuda); this one is on the CPU: use gloo")
        try:
            await self._run(lambda: self.engine.init_weights_group(
                master_address=body["master_address"], master_port=port, rank_offset=rank, world_size=world,
                group_name=group, backend=backend))
        except Exception as err:
            return self._ok(f"Failed to initialize custom process group: {err}.", False)
        return self._ok("Succeeded to initialize custom process group.")

    async def destroy_group(self, request):
        body = await self._json(request)
        group = body.get("group_name", "weight_update_group") if isinstance(body, dict) else None
        try:
            await self._run(self.engine.destroy_weights_group, group)
        except Exception as err:
            return self._ok(f"Failed to destroy custom process group: {err}", False)
        return self._ok("Succeeded to destroy custom process group.")

    async def begin_update(self, request):
        if self.session:
            return self._ok("a weight-update session is already open; call end_weight_update() first", False)
        self.session = True
        return self._ok("Success")

    async def end_update(self, request):
        if not self.session:
            return self._ok("no weight-update session is open; call begin_weight_update() first", False)
        self.session = False
        return self._ok("Success")

    def _version(self, body) -> str | None:
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str):
            raise BadRequest("weight_version: expected a string")
        return version

    async def update_from_distributed(self, request):
        body = await self._json(request)
        if not isinstance(body, dict):
            raise BadRequest("body: expected a JSON object")
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not names:
            raise BadRequest("names, dtypes, shapes: expected three non-empty lists")
        if not len(names) == len(dtypes) == len(shapes):
            raise BadRequest(f"names, dtypes, shapes: lengths differ ({len(names)}, {len(dtypes)}, {len(shapes)})")
        for i, (n, d, sh) in enumerate(zip(names, dtypes, shapes)):
            if not isinstance(n, str):
                raise BadRequest(f"names[{i}]: expected a string")
            if not isinstance(d, str) or not isinstance(getattr(torch, d.removeprefix("torch."), None), torch.dtype):
                raise BadRequest(f"dtypes[{i}]: not a torch dtype name: {d!r}")
            if not isinstance(sh, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in sh):
                raise BadRequest(f"shapes[{i}]: expected a list of sizes >= 0")
        dtypes = [d.removeprefix("torch.") for d in dtypes]
        group, version = body.get("group_name", "weight_update_group"), self._version(body)
        if not self.session:   # as SGLang 0.5.23 (the sender's broadcast then waits out its group timeout)
            return self._ok("update_weights_from_distributed must run between begin_weight_update() and "
                            "end_weight_update()", False)

        def receive_and_load():
            # received in full before any check of names against the model: the sender is mid-broadcast
            named = self.engine.receive_weights(names, dtypes, shapes, group)
            self.engine.load_named(named, version)
        try:
            await self._run(receive_and_load)
        except Exception as err:
            return self._ok(f"Failed to update parameter online: {err}", False)
        return self._ok("Succeeded to update parameter online." + (f" Weight version updated to {version}." if version else ""))

    async def update_from_tensor(self, request):
        from topd_ds.comm.weight_group import load_named_tensors

        body = await self._json(request)
        if not isinstance(body, dict):
            raise BadRequest("body: expected a JSON object")
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or not payloads or not all(isinstance(p, str) for p in payloads):
            raise BadRequest("serialized_named_tensors: expected a non-empty list of base64 strings (one per TP rank)")
        if body.get("load_format") not in (None, "direct"):
            raise BadRequest(f"load_format: only null or 'direct' here, got {body.get('load_format')!r}")
        version = self._version(body)
        try:
            named = load_named_tensors(payloads[0])     # rank 0's payload: this server has one rank
        except ValueError as err:
            raise BadRequest(str(err)) from None
        if not self.session:
            return self._ok("update_weights_from_tensor must run between begin_weight_update() and "
                            "end_weight_update()", False)
        try:
            await self._run(self.engine.load_named, named, version)
        except Exception as err:
            return self._ok(f"Failed to update weights: {err}", False)
        return self._ok("Success" + (f" Weight version updated to {version}." if version else ""))

    async def flush_cache(self, request):
        if self.in_flight:
            return web.Response(status=400, text=f"Cache not flushed: {self.in_flight} requests in flight.\n")
        # KV caches live only for one batch here, so there is nothing persistent to drop.
        return web.Response(text="Cache flushed.\n")

    async def health(self, request):
        return web.Response(text="")

    async def health_generate(self, request):
        await self._submit([Row(input_ids=[self.engine.pad_id], max_new_tokens=1, temperature=0.0)])
        return web.Response(text="")

    async def model_info(self, request):
        e = self.engine
        return web.json_response({"model_path": e.model_dir, "tokenizer_path": e.model_dir, "is_generation": True,
                                  "weight_version": e.weight_version, "vocab_size": e.vocab_size,
                                  "hidden_size": e.hidden_size, "max_positions": e.max_positions,
                                  "hidden_states_encodings": list(HIDDEN_ENCODINGS) if self.hidden_states else [],
                                  "return_hidden_states": self.hidden_states})

    async def weight_version(self, request):
        return web.json_response({"weight_version": self.engine.weight_version})


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="topd-ds serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory (config + weights)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (as SGLang --api-key)")
    ap.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="rows per forward")
    ap.add_argument("--batch-window-ms", type=float, default=DEFAULT_BATCH_WINDOW_MS,
                    help="collect requests into one batch until none arrived for this long")
    ap.add_argument("--weight-version", default=None,
                    help="version tag of the weights loaded at start (SGLang's --weight-version; default 'default')")
    ap.add_argument("--no-hidden-states", action="store_true",
                    help="refuse return_hidden_states (as SGLang without --enable-return-hidden-states)")
    ap.add_argument("--chunked-prefill-size", type=int, default=-1,
                    help="> 0: answer prefill hidden states for the last chunk of that many tokens only, as SGLang "
                         "under chunked prefill (a test mode for the client's re-ask path; -1: all rows)")
    ap.add_argument("--exit-with-parent", action="store_true",
                    help="shut down when the process that started this one exits (used by launch_server)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = HFEngine(args.model, device=args.device, dtype=args.dtype, max_batch=args.max_batch)
    if args.weight_version is not None:
        engine.weight_version = args.weight_version
    engine.chunked_prefill_size = args.chunked_prefill_size
    server = Server(engine, api_key=args.api_key, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                    parent_pid=os.getppid() if args.exit_with_parent else None, hidden_states=not args.no_hidden_states)
    print(f"topd-ds serve: {args.model} on http://{args.host}:{args.port} ({args.device}, {args.dtype})", flush=True)
    # run_app turns SIGINT/SIGTERM into a graceful exit: stop accepting, run cleanup, return.
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None,
                handle_signals=True, shutdown_timeout=5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
