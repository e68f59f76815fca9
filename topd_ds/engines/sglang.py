"""`SGLangClient`: the trainer's `InferenceClient` over SGLang's native HTTP API (and our built-in server).

What it sends (SGLang 0.5.x, checked against sgl-project/sglang: entrypoints/http_server.py,
managers/tokenizer_manager.py, managers/scheduler_output_processor_mixin.py, sampling/sampling_params.py):

* generate: POST /generate {"input_ids": [[..], ..], "sampling_params": {.., "n": n},
  "return_logprob": true}. A batch answers a list of B * n items, prompt-major (item i * n + j is
  sample j of prompt i). output_token_logprobs[j] = [logprob, token_id, null], one per output id.
* score: same endpoint with max_new_tokens 1, greedy, "logprob_start_len": s. SGLang answers
  input_token_logprobs for positions s..L-1 whose FIRST entry is always [null, ids[s], null]
  (the scheduler prepends None and drops the sampling token), so to score tokens start..L-1 we send
  s = start - 1 and drop that entry. input_top_logprobs follows the same layout. With top_k > 0 we ask
  "return_flat_raw_top_logprobs" + "_b64" (SGLang 0.5.23, GenerateReqInput; tokenizer_manager.py
  _build_flat_top_logprobs_fields): the top-k comes back as base64 float32 values / int32 ids of shape
  [rows, k] after `null_prefix` (1 here) empty positions, 10.7 bytes an entry against ~35 as a JSON triple,
  decoded with np.frombuffer (`parse_flat_top_logprobs`); a nested answer (SGLang falls back to it when it
  cannot flatten, or another server) is still read.
* hidden states: "return_hidden_states": true puts meta_info["hidden_states"] = [prefill rows
  (L, H), then one (H,) per decode step]; we send logprob_start_len 0 then, because SGLang only
  recomputes (instead of reusing cached) prefix positions at and after logprob_start_len.
  Under chunked prefill (SGLang's default: 8192 tokens on an H200) only the rows of the request's last
  forward come back: the last R positions. `_hidden_head` asks for the head again until all L rows are
  there (docs/ENGINES.md "Teacher hidden states under chunked prefill").
  SGLang writes them as JSON numbers (~12 bytes a float); a server whose /model_info lists
  "base64" in hidden_states_encodings (the built-in one) is asked "hidden_states_encoding": "base64"
  and answers raw bytes of its dtype (engines/tensor_codec.py), ~6x fewer bytes in bf16.
* weights: POST /update_weights_from_disk {"model_path", "weight_version"} to EVERY url;
  {"success": false} (HTTP 400) is an error. POST /flush_cache answers 400 while requests are in
  flight, so it is retried for up to `flush_timeout_s`. GET /get_weight_version (the built-in
  server), falling back to /model_info's weight_version (SGLang 0.5.23 has no /get_weight_version),
  then /get_model_info, then the last meta_info.weight_version seen.

Transport: aiohttp, at most `max_concurrency` requests in flight, each sent to the url with the
fewest in flight. One bounded retry loop: connection errors, timeouts and HTTP 408/409/429/5xx
are retried up to `max_retries` times with exponential backoff and full jitter (a Retry-After
header wins); any other 4xx raises RequestRejected at once with the server's message (the request is
invalid: a configuration error, which the supervisor never answers with a restart). Every answer is
validated; a malformed one raises ProtocolError naming the field, e.g.
"answer[3].meta_info.output_token_logprobs: expected 8 entries, got 7".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import random
from dataclasses import replace
from typing import Any, Sequence

import aiohttp
import numpy as np
import torch

from topd_ds.engines.launch import HEALTH_PROBE_TIMEOUT_S
from topd_ds.engines.protocol import Completion, SamplingParams, Scores
from topd_ds.engines.tensor_codec import decode_tensor, is_encoded
from topd_ds.errors import ProtocolError, RequestRejected, ServerError

log = logging.getLogger("topd_ds.engines.sglang")

REQUEST_TIMEOUT_S = 600.0        # a whole /generate (long rollouts take minutes)
CONNECT_TIMEOUT_S = 10.0
MAX_RETRIES = 4                  # retries after the first try
BACKOFF_BASE_S = 0.5             # delay before retry r is uniform in [0, base * 2**r], capped
BACKOFF_MAX_S = 30.0
MAX_CONCURRENCY = 64             # requests in flight from this client, all urls together
PROMPTS_PER_REQUEST = 64         # a big batch is split so it spreads over data-parallel servers
FLUSH_TIMEOUT_S = 60.0           # /flush_cache is retried while it answers 400 (requests pending)
FLUSH_POLL_S = 0.2
HEALTH_TIMEOUT_S = HEALTH_PROBE_TIMEOUT_S  # 30 s: SGLang's /health runs a generation (engines/launch.py)
RETRYABLE_STATUSES = frozenset({408, 409, 429})   # plus every status >= 500
MAX_TIMEOUTS = 2                 # a call that timed out this often is given up on: a hung server is found
                                 # within ~2 x timeout_s, not (max_retries + 1) x timeout_s


def is_retryable(status: int | None) -> bool:
    """None means the request never got an answer (connection error or timeout)."""
    return status is None or status in RETRYABLE_STATUSES or status >= 500


def server_message(text: str) -> str:
    """The message of an error answer: SGLang's and the built-in server's {"error": {"message"}}, a
    {"message"} / {"detail"} body, or the text itself; one line, at most 300 characters."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        text = str(msg or body.get("message") or body.get("detail") or text)
    return " ".join(str(text).split())[:300]


def backoff_delay(attempt: int, *, base_s: float, retry_after: str | None = None) -> float:
    """Seconds to wait before retry `attempt` (0-based): Retry-After if given, else full jitter."""
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), BACKOFF_MAX_S)
        except ValueError:
            pass  # an HTTP date: fall back to our own backoff
    return random.uniform(0.0, min(BACKOFF_MAX_S, base_s * 2 ** attempt))


def _field(obj, key, where):
    if not isinstance(obj, dict) or key not in obj:
        raise ProtocolError(f"{where}.{key}: missing")
    return obj[key]


def _list(value, where, length=None) -> list:
    if not isinstance(value, list):
        raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ProtocolError(f"{where}: expected {length} entries, got {len(value)}")
    return value


def _logprob(value, where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value > 1e-4:
        raise ProtocolError(f"{where}: expected a finite logprob <= 0, got {value!r}")
    return float(value)


def _token(value, where) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{where}: expected a token id, got {value!r}")
    return value


def parse_token_logprobs(entries, ids: Sequence[int], where: str, *, first_null: bool = False) -> list[float]:
    """[[lp, id, ..], ..] -> [lp, ..], checking length, finiteness and that ids match `ids`.

    With first_null (prompt logprobs) a reported id 0 is accepted for any token: SGLang 0.5.23
    reports ids >= vocab_size - 1 as 0 there (scheduler_output_processor_mixin.
    _process_input_token_logprobs clips "padded hash values from image tokens"), while the logprob
    itself is the right one (seen in our conformance run).
    """
    _list(entries, where, len(ids))
    out = []
    for j, (entry, tok) in enumerate(zip(entries, ids)):
        if not isinstance(entry, list) or len(entry) < 2:
            raise ProtocolError(f"{where}[{j}]: expected [logprob, token_id, ..], got {entry!r}")
        got = _token(entry[1], f"{where}[{j}][1]")
        if got != tok and not (first_null and got == 0):
            raise ProtocolError(f"{where}[{j}]: token id {entry[1]} != expected {tok}")
        if j == 0 and first_null:
            continue
        out.append(_logprob(entry[0], f"{where}[{j}][0]"))
    return out


def parse_top_logprobs(entries, k: int, where: str) -> tuple[list[list[int]], list[list[float]]]:
    """Per position k triples [lp, id, ..] -> (ids (N, k), logprobs (N, k))."""
    ids, lps = [], []
    for j, pos in enumerate(entries):
        _list(pos, f"{where}[{j}]", k)
        ids.append([_token(e[1] if isinstance(e, list) and len(e) >= 2 else None, f"{where}[{j}]") for e in pos])
        lps.append([_logprob(e[0], f"{where}[{j}]") for e in pos])
    return ids, lps


FLAT_DTYPES = {"float32": "<f4", "int32": "<i4", "int64": "<i8", "float64": "<f8"}  # the widths may change (SGLang)


def parse_flat_top_logprobs(meta: dict, positions: int, k: int, skip: int, where: str):
    """SGLang 0.5.23's flat input top-k (return_flat_raw_top_logprobs[_b64]: tokenizer_manager.py
    _build_flat_top_logprobs_fields) -> (ids (N, k) int64, logprobs (N, k) float32) numpy arrays for the
    positions from `skip` on, of the `positions` the request asked logprobs for. The arrays cover positions
    null_prefix .. positions-1; base64 of little-endian bytes, or flat lists. R x k x 8 bytes raw instead of
    ~35 bytes of JSON per [lp, id, null] triple (docs/SCALING.md "Bytes from the servers")."""
    shape = _list(_field(meta, "input_top_logprobs_shape", where), f"{where}.input_top_logprobs_shape", 2)
    null = _field(meta, "input_top_logprobs_null_prefix", where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in (*shape, null)):
        raise ProtocolError(f"{where}.input_top_logprobs_shape/null_prefix: expected sizes, got {shape}, {null!r}")
    rows, width = shape
    if width != k or null + rows != positions or skip < null:
        raise ProtocolError(f"{where}.input_top_logprobs_shape: {shape} with null_prefix {null} for {positions} "
                            f"positions of top {k} (rows from position {skip} wanted)")
    arrays = []
    for name in ("val", "idx"):
        key = f"input_top_logprobs_{name}_flat"
        if key + "_b64" in meta:
            dtype = FLAT_DTYPES.get(meta.get(key + "_b64_dtype"))
            if dtype is None:
                raise ProtocolError(f"{where}.{key}_b64_dtype: expected one of {sorted(FLAT_DTYPES)}, "
                                    f"got {meta.get(key + '_b64_dtype')!r}")
            try:
                raw = base64.b64decode(meta[key + "_b64"], validate=True)
            except (binascii.Error, TypeError) as err:
                raise ProtocolError(f"{where}.{key}_b64: not valid base64 ({err})") from err
            if len(raw) != rows * width * np.dtype(dtype).itemsize:
                raise ProtocolError(f"{where}.{key}_b64: {len(raw)} bytes for shape {shape} of {dtype}")
            arr = np.frombuffer(raw, dtype=dtype)
        else:
            try:
                arr = np.asarray(_list(_field(meta, key, where), f"{where}.{key}", rows * width), dtype=np.float64)
            except (ValueError, TypeError) as err:
                raise ProtocolError(f"{where}.{key}: not a list of numbers") from err
        arrays.append(arr.reshape(rows, width)[skip - null:])
    lps, ids = arrays
    if not (np.isfinite(lps).all() and (lps <= 1e-4).all()):
        raise ProtocolError(f"{where}.input_top_logprobs_val_flat: expected finite logprobs <= 0")
    if not ((ids >= 0).all() and (ids == np.round(ids)).all()):
        raise ProtocolError(f"{where}.input_top_logprobs_idx_flat: expected token ids")
    return ids.astype(np.int64), lps.astype(np.float32)


def parse_hidden(value, rows: int, width: int | None, where: str, *, tail: bool = False):
    """meta_info.hidden_states -> its prefill block (rows, H), checked: float32 numpy from JSON numbers,
    or a torch tensor of the server's dtype from a tensor_codec object (hidden_states_encoding base64).

    tail=True accepts 1..rows rows: SGLang returns the rows of the last prefill chunk only, i.e. the
    hidden states of the LAST R positions of the input (see `SGLangClient._hidden_head`)."""
    block = _list(value, where)
    if not block:
        raise ProtocolError(f"{where}: empty")
    if is_encoded(block[0]):
        return _check_hidden(_decode(block[0], f"{where}[0]"), rows, width, f"{where}[0]", tail=tail)
    try:
        arr = np.asarray(block[0], dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise ProtocolError(f"{where}[0]: not a rectangular array of numbers") from err
    if arr.ndim != 2 or not (1 <= arr.shape[0] <= rows if tail else arr.shape[0] == rows):
        want = f"(1..{rows}, H)" if tail else f"({rows}, H)"
        raise ProtocolError(f"{where}[0]: expected shape {want}, got {arr.shape}")
    if width is not None and arr.shape[1] != width:
        raise ProtocolError(f"{where}[0]: hidden width {arr.shape[1]} != expected {width}")
    if not np.isfinite(arr).all():
        raise ProtocolError(f"{where}[0]: non-finite values")
    return arr


def _decode(obj, where):
    try:
        return decode_tensor(obj, where)
    except ValueError as err:
        raise ProtocolError(str(err)) from err


def _check_hidden(t, rows: int, width: int | None, where: str, *, tail: bool = False):
    if t.dim() != 2 or not (1 <= t.shape[0] <= rows if tail else t.shape[0] == rows):
        raise ProtocolError(f"{where}: expected shape ({f'1..{rows}' if tail else rows}, H), got {tuple(t.shape)}")
    if width is not None and t.shape[1] != width:
        raise ProtocolError(f"{where}: hidden width {t.shape[1]} != expected {width}")
    if not bool(t.isfinite().all()):
        raise ProtocolError(f"{where}: non-finite values")
    return t


def parse_completion(item, where: str) -> Completion:
    """One /generate answer item -> Completion (validated)."""
    output_ids = [_token(t, f"{where}.output_ids") for t in _list(_field(item, "output_ids", where), f"{where}.output_ids")]
    meta = _field(item, "meta_info", where)
    finish = _field(meta, "finish_reason", f"{where}.meta_info")
    kind = finish.get("type") if isinstance(finish, dict) else None
    if kind not in ("stop", "length", "abort"):
        raise ProtocolError(f"{where}.meta_info.finish_reason: expected type stop|length|abort, got {finish!r}")
    entries = _field(meta, "output_token_logprobs", f"{where}.meta_info")
    logprobs = parse_token_logprobs(entries, output_ids, f"{where}.meta_info.output_token_logprobs")
    return Completion(output_ids=output_ids, logprobs=logprobs, finish_reason=kind)


class SGLangClient:
    """InferenceClient over one or more SGLang (or `topd-ds serve`) urls, or one sglang_router url."""

    def __init__(self, urls: Sequence[str] | str, *, api_key: str | None = None,
                 timeout_s: float = REQUEST_TIMEOUT_S, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 max_retries: int = MAX_RETRIES, backoff: float = BACKOFF_BASE_S,
                 max_concurrency: int = MAX_CONCURRENCY, router: bool = False, hidden_size: int | None = None,
                 prompts_per_request: int = PROMPTS_PER_REQUEST, flush_timeout_s: float = FLUSH_TIMEOUT_S):
        self.urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ValueError("urls: need at least one server url")
        if router and len(self.urls) != 1:
            raise ValueError(f"urls: a router is one url, got {len(self.urls)}")
        self.api_key, self.router, self.hidden_size = api_key, router, hidden_size
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self.max_retries, self.backoff = max_retries, backoff
        self.max_concurrency, self.prompts_per_request = max_concurrency, prompts_per_request
        self.flush_timeout_s = flush_timeout_s
        self.load = {u: 0 for u in self.urls}      # requests in flight per url
        self._turn = 0
        self._sem: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None
        self.last_weight_version: str | None = None
        self.hidden_encoding: str | None = None    # "base64" if every server offers it, else "json"; asked once
        self._chunk: int | None = None             # the server's chunked-prefill size (0: none), asked once

    # ---- transport ------------------------------------------------------------------------------
    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _pick(self) -> str:
        """The url with the fewest requests in flight (ties rotate)."""
        self._turn += 1
        n = len(self.urls)
        order = [self.urls[(self._turn + i) % n] for i in range(n)]
        return min(order, key=lambda u: self.load[u])

    async def _ensure_session(self):
        if self._session is None or self._session.closed:
            self._sem = asyncio.Semaphore(self.max_concurrency)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_concurrency))

    async def _request(self, method: str, path: str, payload: Any = None, *, url: str | None = None,
                       accept: tuple[int, ...] = (), timeout: aiohttp.ClientTimeout | None = None,
                       retries: int | None = None) -> tuple[int, Any]:
        """One call with the retry loop; returns (status, parsed JSON or text). Status < 400 or in `accept`."""
        await self._ensure_session()
        retries = self.max_retries if retries is None else retries
        limit = (timeout or self.timeout).total
        timeouts = 0
        for attempt in range(retries + 1):
            target = url or self._pick()
            status, text, retry_after, error = None, "", None, None
            self.load[target] += 1
            try:
                async with self._sem:
                    async with self._session.request(method, target + path, json=payload, headers=self._headers(),
                                                     timeout=timeout or self.timeout) as resp:
                        status, retry_after = resp.status, resp.headers.get("Retry-After")
                        text = await resp.text()
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                status, error = None, err
            finally:
                self.load[target] -= 1
            if status is not None and (status < 400 or status in accept):
                try:
                    return status, json.loads(text) if text.strip()[:1] in ("{", "[") else text
                except json.JSONDecodeError as err:
                    raise ProtocolError(f"{target}{path}: answer is not valid JSON ({err.msg} at {err.pos})") from err
            what = f"HTTP {status}: {text[:300]!r}" if status is not None else f"{type(error).__name__}: {error}"
            if isinstance(error, asyncio.TimeoutError):   # aiohttp's has no text: say what timed out, and when
                timeouts += 1
                what = f"no answer within {limit:g} s (timeout_s)"
                if timeouts >= MAX_TIMEOUTS or attempt == retries:
                    raise ServerError(f"{method} {target}{path}: {what}, {timeouts} time(s) in a row: "
                                      f"the server is hung or overloaded") from error
            if not is_retryable(status):   # a 4xx: the request is wrong, not the server; resending cannot help
                raise RequestRejected(f"{method} {target}{path}: the server rejected the request as invalid "
                                      f"(HTTP {status}): {server_message(text)} (a configuration error, e.g. "
                                      f"prompt + max_new_tokens past the model's positions; `topd-ds check` "
                                      f"finds most before a run)")
            if attempt == retries:
                raise ServerError(f"{method} {target}{path}: failed after {attempt + 1} tries, last: {what}") from error
            delay = backoff_delay(attempt, base_s=self.backoff, retry_after=retry_after)
            log.debug("%s %s%s: %s; retry %d/%d in %.2f s", method, target, path, what, attempt + 1, retries, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the retry loop returns or raises")

    async def _generate_call(self, payload: dict, expected: int) -> list:
        _, answer = await self._request("POST", "/generate", payload)
        if isinstance(answer, dict) and expected == 1:
            answer = [answer]
        _list(answer, "answer", expected)
        for item in answer:
            version = item.get("meta_info", {}).get("weight_version") if isinstance(item, dict) else None
            if isinstance(version, str):
                self.last_weight_version = version
        return answer

    def _chunks(self, items: Sequence) -> list[tuple[int, int]]:
        step = max(1, self.prompts_per_request)
        return [(i, min(i + step, len(items))) for i in range(0, len(items), step)]

    # ---- the InferenceClient API --------------------------------------------------------------
    async def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                       n: int = 1, seeds: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """n samples per prompt: result[p][j] is sample j of prompt p.

        seeds[p][j] is the sampling seed of sample j of prompt p (the pipeline's run-unique seeds,
        `topd_ds.rollout.seeds`); without `seeds`, params.seed (if set) gives seed + p * n + j. A seeded call
        sends every sample as its own item (n = 1, its own sampling_seed): SGLang gives the n samples
        of one item the same seed (sgl-project/sglang PR 28805), so they would be one random stream."""
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        if not prompts:
            return []
        if seeds is None and params.seed is not None:
            seeds = [[int(params.seed) + i * n + j for j in range(n)] for i in range(len(prompts))]
        if seeds is not None:
            if len(seeds) != len(prompts) or any(len(row) != n for row in seeds):
                raise ValueError(f"seeds: expected {len(prompts)} lists of {n} seeds (one per sample)")
            base = {**params.to_sglang(), "n": 1}
            base.pop("sampling_seed", None)

        async def one(lo, hi):
            ids = [list(map(int, p)) for p in prompts[lo:hi]]
            if seeds is None:
                payload = {"input_ids": ids, "sampling_params": {**params.to_sglang(), "n": n}}
            else:   # one item per sample, each with its own seed
                payload = {"input_ids": [p for p in ids for _ in range(n)],
                           "sampling_params": [{**base, "sampling_seed": int(s)} for row in seeds[lo:hi] for s in row]}
            payload["return_logprob"] = True
            answer = await self._generate_call(payload, (hi - lo) * n)
            comps = [parse_completion(item, f"answer[{i}]") for i, item in enumerate(answer)]
            return [comps[i * n:(i + 1) * n] for i in range(hi - lo)]

        parts = await asyncio.gather(*(one(lo, hi) for lo, hi in self._chunks(prompts)))
        return [c for part in parts for c in part]

    async def continue_from(self, prefixes: Sequence[Sequence[int]], k: int, params: SamplingParams, *,
                            seeds: Sequence[int] | None = None) -> list[Completion]:
        """Up to k tokens from each prefix, batched; EOS / stop tokens may end a window early.
        seeds[i]: the sampling seed of prefix i's window."""
        groups = await self.generate(prefixes, replace(params, max_new_tokens=k, ignore_eos=False), n=1,
                                     seeds=None if seeds is None else [[s] for s in seeds])
        return [g[0] for g in groups]

    async def score(self, sequences: Sequence[Sequence[int]], *, start: Sequence[int] | int, top_k: int = 0,
                    return_hidden: bool = False) -> list[Scores]:
        """Logprobs of seq[start:] given its prefix (+ top-k per position, + final hidden states (L, H))."""
        starts = [start] * len(sequences) if isinstance(start, int) else list(start)
        if len(starts) != len(sequences):
            raise ValueError(f"start: expected {len(sequences)} entries, got {len(starts)}")
        for i, (seq, s) in enumerate(zip(sequences, starts)):
            if not 1 <= s < len(seq):
                raise ValueError(f"start[{i}]: must be in [1, {len(seq) - 1}] for a sequence of {len(seq)}, got {s}")

        encoding = await self.negotiate_hidden_encoding() if return_hidden else None

        async def one(lo, hi):
            seqs = [list(map(int, q)) for q in sequences[lo:hi]]
            sent = [0 if return_hidden else s - 1 for s in starts[lo:hi]]
            payload = {"input_ids": seqs, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                       "return_logprob": True, "logprob_start_len": sent, "top_logprobs_num": top_k}
            if top_k > 0:  # top-k as base64 float32 / int32 arrays, not [lp, id, null] JSON triples (SGLang 0.5.23)
                payload["return_flat_raw_top_logprobs"] = payload["return_flat_raw_top_logprobs_b64"] = True
            if return_hidden:
                payload["return_hidden_states"] = True
                if encoding == "base64":
                    payload["hidden_states_encoding"] = "base64"
            answer = await self._generate_call(payload, hi - lo)
            scores = [self._parse_score(item, seq, s, s0, top_k, return_hidden, f"answer[{lo + i}]")
                      for i, (item, seq, s, s0) in enumerate(zip(answer, seqs, starts[lo:hi], sent))]
            if return_hidden:
                heads = await asyncio.gather(*(self._hidden_head(seq, sc.hidden_states, f"answer[{lo + i}]")
                                               for i, (seq, sc) in enumerate(zip(seqs, scores))))
                for sc, rows in zip(scores, heads):
                    sc.hidden_states = rows
            return scores

        parts = await asyncio.gather(*(one(lo, hi) for lo, hi in self._chunks(sequences)))
        return [s for part in parts for s in part]

    async def _hidden_head(self, seq: list[int], tail: np.ndarray, where: str) -> np.ndarray:
        """All L rows of `seq`'s hidden states, given the tail rows its scoring answer carried.

        SGLang returns prefill hidden states only for the tokens computed in the request's LAST forward:
        the last prefill chunk (chunked prefill splits a prompt longer than --chunked-prefill-size, and a
        shorter one too when the requests of one batch exceed that token budget together), after any
        prefix reused from the radix cache. Those rows are always the last R positions. The missing head
        [0, L - R) is asked for again, seq[:b] with logprob_start_len = b - chunk (SGLang recomputes from
        logprob_start_len, reusing the cached prefix before it), until every row is there; each answer
        again brings its own tail rows, at least one, so this ends. With no chunking (the built-in server,
        `--chunked-prefill-size -1`) the first answer already has all L rows and nothing more is sent."""
        parts, b = [tail], len(seq) - tail.shape[0]
        chunk = await self._chunk_size() if b > 0 else None
        while b > 0:
            payload = {"input_ids": seq[:b], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                       "return_logprob": True, "logprob_start_len": max(0, b - chunk) if chunk else 0,
                       "return_hidden_states": True}
            if self.hidden_encoding == "base64":
                payload["hidden_states_encoding"] = "base64"
            answer = await self._generate_call(payload, 1)
            rows = parse_hidden(_field(_field(answer[0], "meta_info", where), "hidden_states", f"{where}.meta_info"),
                                b, self.hidden_size, f"{where}.meta_info.hidden_states (rows 0..{b - 1})", tail=True)
            parts.insert(0, rows)
            b -= rows.shape[0]
        if len(parts) > 1:
            out = torch.cat(parts) if isinstance(tail, torch.Tensor) else np.concatenate(parts)
        else:
            out = tail
        assert out.shape[0] == len(seq), f"{where}: assembled {out.shape[0]} hidden rows for {len(seq)} tokens"
        return out

    async def _chunk_size(self) -> int | None:
        """The server's --chunked-prefill-size from /get_server_info (None: unknown, or chunking off)."""
        if self._chunk is None:
            info = await self.server_info()
            size = info.get("chunked_prefill_size") if isinstance(info, dict) else None
            self._chunk = size if isinstance(size, int) and size > 0 else 0
        return self._chunk or None

    async def server_info(self, url: str | None = None) -> dict | None:
        """SGLang's GET /get_server_info (its launch flags), or None where there is none (built-in server)."""
        status, body = await self._request("GET", "/get_server_info", url=url or self.urls[0], accept=(404,))
        return body if status == 200 and isinstance(body, dict) else None

    async def missing_flags(self, *, hidden_states: bool = False, deterministic: bool = False) -> list[str]:
        """"URL: --flag (why)" for each launch flag a server lacks, read from /get_server_info (only SGLang
        has it; the built-in server does all of this without flags)."""
        async def one(url):
            info = await self.server_info(url)
            if info is None:
                return []
            out = []
            if hidden_states and not info.get("enable_return_hidden_states"):
                out.append(f"{url}: --enable-return-hidden-states (teacher.scoring: server scores with teacher hidden states)")
            if deterministic and not info.get("enable_deterministic_inference"):
                out.append(f"{url}: --enable-deterministic-inference (SGLang ignores sampling_seed without it)")
            return out
        return [m for part in await asyncio.gather(*(one(u) for u in self.urls)) for m in part]

    def _parse_score(self, item, seq, start, sent, top_k, return_hidden, where) -> Scores:
        meta = _field(item, "meta_info", where)
        entries = _field(meta, "input_token_logprobs", f"{where}.meta_info")
        lps = parse_token_logprobs(entries, seq[sent:], f"{where}.meta_info.input_token_logprobs", first_null=True)
        lps = lps[start - sent - 1:]                                            # positions start..L-1
        topk_ids = topk_lps = hidden = None
        if top_k > 0 and "input_top_logprobs_shape" in meta:   # the flat form asked for: numpy (N, k) arrays
            topk_ids, topk_lps = parse_flat_top_logprobs(meta, len(seq) - sent, top_k, start - sent, f"{where}.meta_info")
        elif top_k > 0:   # nested: a server without the flat form, or SGLang's fallback when it cannot flatten
            tops = _list(_field(meta, "input_top_logprobs", f"{where}.meta_info"),
                         f"{where}.meta_info.input_top_logprobs", len(seq) - sent)
            topk_ids, topk_lps = parse_top_logprobs(tops[start - sent:], top_k, f"{where}.meta_info.input_top_logprobs")
        if return_hidden:   # the tail rows; `_hidden_head` completes them
            hidden = parse_hidden(_field(meta, "hidden_states", f"{where}.meta_info"), len(seq), self.hidden_size,
                                  f"{where}.meta_info.hidden_states", tail=True)
        return Scores(token_logprobs=lps, topk_ids=topk_ids, topk_logprobs=topk_lps, hidden_states=hidden)

    async def negotiate_hidden_encoding(self) -> str:
        """"base64" when every server lists it in /model_info's hidden_states_encodings (the built-in
        server does; SGLang 0.5.x has no such field and gets plain JSON requests), else "json"."""
        if self.hidden_encoding is None:
            async def offers(url):
                try:  # a router or an older server may not answer /model_info at all: then plain JSON
                    status, body = await self._request("GET", "/model_info", url=url, accept=(404,))
                except ServerError:
                    return False
                return status == 200 and isinstance(body, dict) and "base64" in (body.get("hidden_states_encodings") or ())
            self.hidden_encoding = "base64" if all(await asyncio.gather(*(offers(u) for u in self.urls))) else "json"
        return self.hidden_encoding

    async def update_weights(self, path: str, version: str) -> None:
        """Every server loads `path` and tags it `version`; any failure raises ServerError."""
        async def one(url):
            status, body = await self._request("POST", "/update_weights_from_disk",
                                               {"model_path": path, "weight_version": version}, url=url, accept=(400,))
            if not isinstance(body, dict) or body.get("success") is not True:
                msg = body.get("message") if isinstance(body, dict) else body
                raise ServerError(f"{url}/update_weights_from_disk: failed (HTTP {status}): {msg}")
        await asyncio.gather(*(one(u) for u in self.urls))
        self.last_weight_version = version

    # ---- in-memory weight routes (SGLang 0.5.23: managers/io_struct.py, entrypoints/http_server.py) ----------
    async def _post_ok(self, url: str, path: str, body: dict) -> str:
        """POST body; {"success": true} or ServerError naming url and path. No retries: each of these moves
        weights or joins a group, which a blind resend could do twice."""
        status, answer = await self._request("POST", path, body, url=url, accept=(400,), retries=0)
        if not isinstance(answer, dict) or answer.get("success") is not True:
            msg = answer.get("message") if isinstance(answer, dict) else answer
            if isinstance(answer, dict) and isinstance(answer.get("error"), dict):   # a 400 for a malformed body
                msg = answer["error"].get("message")
            raise ServerError(f"{url}{path}: failed (HTTP {status}): {msg}")
        return str(answer.get("message", ""))

    async def _in_session(self, url: str, path: str, body: dict) -> None:
        """SGLang 0.5.23 loads tensors only inside a weight-update session: /begin_weight_update, the call,
        /end_weight_update (scheduler_components/weight_updater.py). A session a killed trainer left open is
        closed first; a server without the session endpoints (404) gets the call alone."""
        status, answer = await self._request("POST", "/begin_weight_update", {}, url=url, accept=(400, 404),
                                             retries=0)
        if status == 400 and "already open" in str(answer):
            await self._request("POST", "/end_weight_update", {}, url=url, accept=(400,), retries=0)
            status, answer = await self._request("POST", "/begin_weight_update", {}, url=url, accept=(400,),
                                                 retries=0)
        if status == 400:
            raise ServerError(f"{url}/begin_weight_update: failed (HTTP 400): {answer}")
        try:
            await self._post_ok(url, path, body)
        finally:
            if status != 404:
                await self._request("POST", "/end_weight_update", {}, url=url, accept=(400,), retries=0)

    async def tp_sizes(self) -> list[int]:
        """Ranks each server brings to a weight-update group: SGLang's tp_size (/get_server_info), else 1."""
        async def one(url):
            info = await self.server_info(url)
            size = info.get("tp_size") if isinstance(info, dict) else None
            return size if isinstance(size, int) and size >= 1 else 1
        return list(await asyncio.gather(*(one(u) for u in self.urls)))

    async def init_weights_group(self, *, master_address: str, master_port: int, backend: str, join,
                                 group_name: str = "weight_update_group") -> int:
        """Every server joins one group with the trainer (rank 0; server i's ranks start at 1 + the ranks of
        servers before it): POST /init_weights_update_group to all while `join(world_size)` (blocking: the
        trainer's own init, it hosts the store) runs in a thread. Returns the world size."""
        sizes = await self.tp_sizes()
        # a group of that name left by an earlier run (or before a failure) makes SGLang refuse the init ("The
        # specified group name has already been created"), and our join would then wait out its timeout
        await self.destroy_weights_group(group_name)
        world = 1 + sum(sizes)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        posts = [self._post_ok(u, "/init_weights_update_group",
                               {"master_address": master_address, "master_port": master_port, "rank_offset": off,
                                "world_size": world, "group_name": group_name, "backend": backend})
                 for u, off in zip(self.urls, offsets)]
        await _together(asyncio.to_thread(join, world), *posts)
        return world

    async def destroy_weights_group(self, group_name: str = "weight_update_group") -> None:
        await asyncio.gather(*(self._request("POST", "/destroy_weights_update_group", {"group_name": group_name},
                                             url=u, accept=(400, 404), retries=0) for u in self.urls),
                             return_exceptions=True)

    async def update_weights_from_distributed(self, names, dtypes, shapes, version: str, broadcast, *,
                                              group_name: str = "weight_update_group", abort=None) -> None:
        """Announce the tensors to every server and run `broadcast()` (blocking: rank 0 sends each tensor, in
        this order) in a thread meanwhile; dtypes as torch names without "torch." ("bfloat16"). `abort()` is
        called as soon as one server's announce fails, so the broadcast can stop waiting for its receivers."""
        body = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
                "group_name": group_name, "flush_cache": True, "weight_version": version}

        async def announce(url):
            try:
                await self._in_session(url, "/update_weights_from_distributed", body)
            except BaseException:
                if abort is not None:
                    abort()
                raise
        await _together(asyncio.to_thread(broadcast), *(announce(u) for u in self.urls))
        self.last_weight_version = version

    async def update_weights_from_tensor(self, payload: str, version: str) -> None:
        """Every server (same machine: the payload is a shared-memory handle) loads the named tensors of
        `payload` (weight_group.serialize_named_tensors), one copy per tensor-parallel rank."""
        sizes = await self.tp_sizes()

        async def one(url, tp):
            body = {"serialized_named_tensors": [payload] * tp, "load_format": None, "flush_cache": True,
                    "weight_version": version}
            await self._in_session(url, "/update_weights_from_tensor", body)
        await asyncio.gather(*(one(u, tp) for u, tp in zip(self.urls, sizes)))
        self.last_weight_version = version

    async def flush_cache(self) -> None:
        """Flush every server; SGLang refuses (400) while requests are pending, so poll until it accepts."""
        async def one(url):
            deadline = asyncio.get_running_loop().time() + self.flush_timeout_s
            while True:
                status, body = await self._request("POST", "/flush_cache", url=url, accept=(400,))
                if status < 400:
                    return
                if asyncio.get_running_loop().time() > deadline:
                    raise ServerError(f"{url}/flush_cache: still refused after {self.flush_timeout_s:.0f} s: {body!r}")
                await asyncio.sleep(FLUSH_POLL_S)
        await asyncio.gather(*(one(u) for u in self.urls))

    async def health(self) -> bool:
        """True when every url answers GET /health with 200 (one try each, short timeout)."""
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)

        async def one(url):
            try:
                await self._request("GET", "/health", url=url, timeout=timeout, retries=0)
                return True
            except ServerError:
                return False
        return all(await asyncio.gather(*(one(u) for u in self.urls)))

    async def weight_version(self) -> str:
        """The weight version every server reports; ServerError if they disagree."""
        async def one(url):
            for path in ("/get_weight_version", "/model_info", "/get_model_info"):
                status, body = await self._request("GET", path, url=url, accept=(404,))
                if status == 200 and isinstance(body, dict) and isinstance(body.get("weight_version"), str):
                    return body["weight_version"]
            if self.last_weight_version is not None:
                return self.last_weight_version       # as last seen in meta_info.weight_version
            raise ProtocolError(f"{url}: weight_version: missing from /get_weight_version and /model_info")
        versions = await asyncio.gather(*(one(u) for u in self.urls))
        if len(set(versions)) != 1:
            raise ServerError(f"weight_version: servers disagree: {dict(zip(self.urls, versions))}")
        return versions[0]

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


async def _together(*aws):
    """Await all; the first error is raised once all have ended (a broadcast thread cannot be cancelled,
    and a request must not be left unread)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
