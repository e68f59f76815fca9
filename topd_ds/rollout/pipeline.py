"""The asynchronous producer of labelled batches: rollout -> teacher scoring -> candidates -> probing -> OT.

One background thread runs an asyncio loop that builds the batch for step k while the trainer works on
step k-1 (paper Sec 3 and DESIGN.md "data flow"):

    rollouts       student server samples G responses per prompt (temperature 1.0)
    scoring        teacher server scores them (final hidden states -> full-vocab logits with the teacher's
                   lm_head, or top-k logprobs); student server scores its top-k for candidate selection;
                   the teacher's logprobs at those ids are computed on `score_device` (rank 0's training
                   device), chunked over rows and vocabulary (selection.py), with no collective.
                   `teacher.scoring: local`: no hidden states are asked for (the trainer's ranks compute
                   them); the teacher answers its top-k, from which the selection takes its logprobs
    candidates     per-token reverse-KL selection score, top fraction per sequence (paper m/N ~ 2.25%)
    probing        teacher and student each continue K tokens from every candidate prefix x_<t
    OT             cost 1 - cos on fixed token embeddings, Sinkhorn -> D_OT and plan
    labelling      false alarms (bottom-q D_OT, threshold or the low-loss range) vs real divergent points

Queue and staleness: batches go into a bounded `queue.Queue(maxsize=queue_size)`. The lag is fixed: batch k is
sampled by exactly version `version_for(k)` = the newest synced version <= k - max_staleness (never older than
the version the run started from), not by whatever the server happens to hold when build(k) starts. Two
halves: build(k) starts once the student server holds that version (`publish_version` is called by the trainer
after each weight sync lands), and the trainer's sync of version v is held back (`wait_built(v)`) until every
build that must still use an older version is done, so the server is never ahead. max_staleness=0 is
synchronous on-policy training; with max_staleness=1 batch k+1 is sampled by version k while the trainer trains
on batch k. The same seed then gives the same run at any staleness (with the built-in servers, which run each
request as its own batch; docs/TRAINING.md "Reproducible runs"). Each batch records its version; the trainer
logs the staleness.
Server faults: a build that raises ServerError is handed to `supervisor.recover(err)` (which restarts a
built-in server with the current weights, or waits for a user-given one, or raises ServerFailure past
server.max_restarts) and is then rebuilt from scratch for the same step with the same seeds, so a batch is
never dropped or half-used and the data stay deterministic; `stats["rebuilds"]` counts the retries.
Shutdown: `close()` sets a stop flag, cancels the producer (and its builds in flight), closes the clients,
stops the loop and joins its thread; an exception in the producer is re-raised by the trainer's next `get()`.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import os
import queue
import threading
import time
from typing import Optional

import torch

from topd_ds.rollout import divergence, seeds
from topd_ds.rollout.batch import Batch, Windows
from topd_ds.engines.protocol import SamplingParams
from topd_ds.rollout.selection import teacher_logprobs_at_chunked, teacher_logprobs_from_topk

PROBING_MODES = ("opd_dw_low_ot", "opd_dw_high_ot", "topd")
# asyncio's default executor's size (Python 3.11 concurrent/futures/thread.py:142), so no path that waited on a
# free worker before waits longer now
IO_WORKERS = min(32, (os.cpu_count() or 1) + 4)


def started_thread_pool(workers: int, name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A ThreadPoolExecutor whose `workers` threads all run before it is returned (the stock one starts them
    lazily): each start-up task waits at a barrier until every worker holds one."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    barrier = threading.Barrier(workers + 1)
    for _ in range(workers):
        pool.submit(barrier.wait)
    barrier.wait()
    return pool


def selection_score(student_topk_ids, student_topk_logprobs, teacher_logprobs_at):
    """Per-token reverse KL restricted to the student's top-k: sum_v p_S(v) (log p_S(v) - log p_T(v)).

    With k = vocab size this is the exact reverse KL; with k < V it misses the student's tail mass,
    which is small where the student is confident and is only used to rank positions. Shapes (R, k)."""
    p = student_topk_logprobs.exp()
    return (p * (student_topk_logprobs - teacher_logprobs_at)).sum(-1)  # (R,)


def teacher_logprobs_at(hidden, head_weight, ids, *, chunk: int = 1024):
    """log p_T(ids | position) from final hidden states (R, H) and lm_head (V, H) without keeping (R, V):
    logsumexp is taken chunk by chunk along R. ids (R, k) -> (R, k). The CPU reference of
    selection.teacher_logprobs_at_chunked, which the pipeline uses (on the training device)."""
    out = []
    for lo in range(0, hidden.shape[0], chunk):
        h = hidden[lo:lo + chunk].float()
        logits = h @ head_weight.float().T                       # (c, V)
        out.append(logits.gather(-1, ids[lo:lo + chunk]) - logits.logsumexp(-1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(ids.shape)


def _pad_windows(completions, k: int, pad_id: int):
    ids = torch.full((len(completions), k), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), k), dtype=torch.bool)
    for i, c in enumerate(completions):
        n = min(len(c.output_ids), k)
        ids[i, :n] = torch.tensor(c.output_ids[:n], dtype=torch.long)
        mask[i, :n] = True
    return ids, mask


class Pipeline:
    """Produces `Batch`es for steps start_step, start_step+1, ... in a background thread (see module doc).

    The thread owns one asyncio loop; the server clients are created in it (`make_clients()` is called
    there) and the trainer runs its own server calls (weight sync, eval) on it through `call()`."""

    def __init__(self, *, prompts, make_clients, teacher_head, embedding, cfg, start_step: int,
                 eos_id: int, pad_id: int, weight_version: int, produce: bool = True, supervisor=None,
                 score_device=None, cut_rollout=None):
        self.prompts = prompts              # sequence of prompt id lists (a list, or PromptSet.prompt_ids: read when drawn)
        self.teacher_head = teacher_head    # (V, H) teacher lm_head weight (float32, CPU)
        self.score_device = torch.device(score_device or "cpu")  # where selection scores are computed
        self._head_on_device = None
        self.cut_rollout = cut_rollout      # (ids, prompt_len) -> response tokens kept (tasks/oracle_cut.py), or None
        self.embedding = embedding          # (V, D) table for the OT ground cost
        self.cfg = cfg
        self.eos_id, self.pad_id = eos_id, pad_id
        self.next_step = start_step
        self._version = weight_version
        self._start_version = weight_version  # batches before the first sync of this run use it
        self._built = set()                  # steps whose build is done (rebuilds included)
        self._built_through = start_step - 1  # every step <= this is built
        self._produce_batches = produce
        self.supervisor = supervisor        # engines.supervisor.Supervisor (recover / succeeded), or None
        self._queue = queue.Queue(maxsize=cfg.pipeline.queue_size)
        self._stop = threading.Event()
        self._failure = None                # set by fail(): get() raises it
        self.loop = asyncio.new_event_loop()
        # to_thread (scoring, weight serialisation, the supervisor's waits) and aiohttp's name lookups run on the
        # loop's default executor; asyncio's own spawns a worker whenever none is idle, so under load the
        # trainer's thread count crept up mid-run (CI: 13 -> 14 in the soak's second half). A pool started whole
        # keeps it constant, and a growing count still means a leak.
        self._executor = started_thread_pool(IO_WORKERS, "topd-io")
        self.loop.set_default_executor(self._executor)
        self._thread = threading.Thread(target=self.loop.run_forever, name="topd-pipeline", daemon=True)
        self._thread.start()
        self.student, self.teacher = self.call(make_clients())
        self._producer = None

    # -- trainer side -----------------------------------------------------------------------------
    def call(self, coro, timeout: Optional[float] = None):
        """Run a coroutine on the pipeline's loop from the trainer's thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self):
        if self._produce_batches:
            self._producer = asyncio.run_coroutine_threadsafe(self._produce(), self.loop)
        return self

    def publish_version(self, version: int):
        """The student server now holds weights of `version` (the trainer's step count after a sync)."""
        self._version = version

    def version_for(self, step: int) -> int:
        """The weight version batch `step` is sampled with (fixed lag, see module doc)."""
        lag, every = self.cfg.pipeline.max_staleness, self.cfg.train.sync_every
        return max(self._start_version, (step - lag) // every * every)

    async def wait_built(self, version: int):
        """Return once no build still needs a version older than `version`: the trainer may then load `version`
        into the student server. Returns at once when no batches are produced (stage 1) or the producer
        stopped (its error reaches the trainer through get())."""
        last = min(version + self.cfg.pipeline.max_staleness - 1, self.cfg.train.steps - 1)
        while self._produce_batches and self._built_through < last and self._failure is None:
            if self._producer is not None and self._producer.done():
                return
            await asyncio.sleep(0.005)

    def _mark_built(self, step: int):
        self._built.add(step)
        while self._built_through + 1 in self._built:
            self._built_through += 1
            self._built.discard(self._built_through)

    def fail(self, err: BaseException):
        """Make the trainer's next get() raise `err` (a weight sync gave up: no batch will come)."""
        self._failure = err

    def get(self, timeout: Optional[float] = None, give_up=None) -> Optional[Batch]:
        """The next batch; None if `give_up()` turns true while waiting (the trainer's stop request)."""
        t0 = time.perf_counter()
        while True:
            if self._failure is not None:
                raise self._failure
            if give_up is not None and give_up():
                return None
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if self._producer is not None and self._producer.done() and self._queue.empty():
                    self._producer.result()  # re-raise the producer's exception
                    raise RuntimeError("pipeline producer stopped without producing a batch")
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    raise TimeoutError("no batch from the pipeline")
        item.stats["wait_s"] = time.perf_counter() - t0
        item.stats["queue_depth"] = self._queue.qsize()
        return item

    def close(self):
        """Stop producing, cancel what still runs on the loop (builds, a weight update in flight when the
        trainer stops early), close the clients, stop the loop and join its thread."""
        self._stop.set()
        if self._producer is not None:
            self._producer.cancel()
        for coro in (self._cancel_tasks(), self._close_clients()):
            try:
                self.call(coro, timeout=30)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _cancel_tasks(self):
        """Cancel every other task on the loop and wait until they end: a task still pending when the loop
        stops is reported at exit as 'Task was destroyed but it is pending!'."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_clients(self):
        for client in (self.student, self.teacher):
            await client.close()

    # -- producer side ----------------------------------------------------------------------------
    async def _produce(self):
        """Start build(k) once the student server holds version_for(k); batches enter the queue in step order,
        at most queue_size + 1 built or in flight (the bound of a producer that holds one batch while the queue
        is full). max_staleness=0 stays serial: build(k) waits for version k, i.e. batch k-1 trained."""
        bound = self.cfg.pipeline.queue_size + 1
        pending = collections.deque()  # build tasks, in step order
        try:
            while not self._stop.is_set():
                while pending and pending[0].done() and not self._queue.full():
                    self._queue.put_nowait(pending.popleft().result())  # a build's exception stops the producer
                step = self.next_step
                if self._version >= self.version_for(step) and len(pending) + self._queue.qsize() < bound:
                    pending.append(asyncio.ensure_future(self.build_retrying(step)))
                    self.next_step += 1
                    continue
                await asyncio.sleep(0.005)
        finally:
            for task in pending:
                task.cancel()

    def prompts_for_step(self, step: int) -> list:
        """The prompts of a step depend only on (seed, step): a resumed run sees the same data."""
        from topd_ds.data import step_indices  # the epoch's order is cached: a 1.2M-row set is not reshuffled per step

        idx = step_indices(len(self.prompts), step, self.cfg.rollout.prompts_per_step, seed=self.cfg.train.seed,
                           shuffle=self.cfg.data.shuffle)
        return [self.prompts[i] for i in idx]

    async def build_retrying(self, step: int) -> Batch:
        """build(step), rebuilt from scratch after each ServerError once `supervisor.recover` returns; its
        ServerFailure (too many failures in a row) stops the producer. Without a supervisor: one try."""
        if self.supervisor is None:
            batch, rebuilds = await self.build(step, self._version), 0
        else:
            batch, rebuilds = await self.supervisor.retry(lambda: self.build(step, self._version))
            self.supervisor.succeeded()
        batch.stats["rebuilds"] = rebuilds
        self._mark_built(step)
        return batch

    async def build(self, step: int, version: int) -> Batch:
        cfg = self.cfg
        stats, t = {}, time.perf_counter()
        prompts = self.prompts_for_step(step)
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, stop_token_ids=(self.eos_id,))
        n = cfg.rollout.n_per_prompt
        # one seed per sample, unique over the run (topd_ds.rollout.seeds): a rebuild or a resumed run samples the same
        groups = await self.student.generate(prompts, params, n=n,
                                             seeds=seeds.seed_grid(cfg.train.seed, seeds.ROLLOUT, step, len(prompts), n))
        sequences, prompt_lens = [], []
        for prompt, group in zip(prompts, groups):
            for c in group:
                sequences.append(list(prompt) + list(c.output_ids))
                prompt_lens.append(len(prompt))
        stats["rollout_s"] = time.perf_counter() - t
        stats["response_len"] = sum(len(s) - p for s, p in zip(sequences, prompt_lens)) / len(sequences)
        # machine-independent cost (issue 25): every token the servers sample for this batch (probes added below)
        stats["tokens_generated"] = sum(len(s) - p for s, p in zip(sequences, prompt_lens))
        if self.cut_rollout is not None:  # the oracle diagnostic: nothing after a rollout's first error is scored
            sequences = [s[:p + self.cut_rollout(s, p)] for s, p in zip(sequences, prompt_lens)]
            stats["tokens_cut"] = stats["tokens_generated"] - sum(len(s) - p for s, p in zip(sequences, prompt_lens))
        batch = Batch(step=step, weight_version=version, sequences=sequences, prompt_lens=prompt_lens, stats=stats)

        t = time.perf_counter()
        await self.score(batch)
        stats["scoring_s"] = time.perf_counter() - t
        if cfg.topd.mode in PROBING_MODES:
            await self._probe_and_label(batch)
        return batch

    async def score(self, batch: Batch):
        """Teacher hidden states (full vocab) or top-k, plus the student's top-k for the selection score.

        `teacher.scoring: local` with the full estimator: the trainer's ranks compute the teacher's hidden states,
        so none is asked for here (batch.teacher_hidden stays None); the selection uses the teacher server's
        top-k at each position instead (selection.teacher_logprobs_from_topk; exact when top_k >= V)."""
        cfg = self.cfg
        full = cfg.opd.estimator == "full"
        ask_hidden = full and cfg.teacher.scoring == "server"      # the only request for hidden states
        k_sel = min(cfg.opd.top_k, self.teacher_head.shape[0])
        teacher_task = self.teacher.score(batch.sequences, start=batch.prompt_lens,
                                          top_k=0 if ask_hidden else (k_sel if full else cfg.opd.top_k),
                                          return_hidden=ask_hidden)
        student_task = self.student.score(batch.sequences, start=batch.prompt_lens, top_k=k_sel)
        t_scores, s_scores = await asyncio.gather(teacher_task, student_task)
        batch.teacher_token_logprobs, batch.selection_score = [], []
        batch.teacher_hidden = [] if ask_hidden else None
        batch.teacher_topk_ids = None if full else []
        batch.teacher_topk_logprobs = None if full else []
        for seq, start, ts, ss in zip(batch.sequences, batch.prompt_lens, t_scores, s_scores):
            n_resp = len(seq) - start
            batch.teacher_token_logprobs.append(torch.tensor(ts.token_logprobs[-n_resp:], dtype=torch.float32))
            s_ids = torch.as_tensor(ss.topk_ids[-n_resp:], dtype=torch.long)         # (R, k)
            s_lp = torch.as_tensor(ss.topk_logprobs[-n_resp:], dtype=torch.float32)  # (R, k)
            if ask_hidden:
                # hidden state at position p predicts token p+1: rows start-1 .. len-2 predict the response
                # the server's dtype is kept (bf16 from a bf16 server over base64): exact, half the bytes
                hidden = torch.as_tensor(ts.hidden_states)[start - 1:len(seq) - 1]
                batch.teacher_hidden.append(hidden)
                # (R, V) product on the scoring device (rank 0's training device), in a worker thread so
                # the loop keeps serving the other builds' HTTP meanwhile
                t_at = (await asyncio.to_thread(teacher_logprobs_at_chunked, hidden, self._scoring_head(),
                                                s_ids)).cpu()
            else:
                t_ids = torch.as_tensor(ts.topk_ids[-n_resp:], dtype=torch.long)
                t_lp = torch.as_tensor(ts.topk_logprobs[-n_resp:], dtype=torch.float32)
                if not full:   # the top-k estimator's loss uses them; the local teacher's full loss does not
                    batch.teacher_topk_ids.append(t_ids)
                    batch.teacher_topk_logprobs.append(t_lp)
                # student ids outside the teacher's top-k get the teacher's smallest listed logprob
                t_at = teacher_logprobs_from_topk(s_ids, t_ids, t_lp)
            batch.selection_score.append(selection_score(s_ids, s_lp, t_at))

    def _scoring_head(self) -> torch.Tensor:
        """The teacher lm_head on score_device (float32), copied there once."""
        if self._head_on_device is None:
            self._head_on_device = self.teacher_head.to(self.score_device, torch.float32)
        return self._head_on_device

    async def _probe_and_label(self, batch: Batch):
        cfg, stats = self.cfg, batch.stats
        gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + batch.step)
        scores, mask = stack_ragged(batch.selection_score)
        count = cfg.topd.candidate_count or None
        fraction = None if count else cfg.topd.candidate_fraction
        high = divergence.select_candidates(scores, mask, fraction=fraction, count=count, mode="high", generator=gen)
        low = None
        if cfg.topd.false_alarm == "low_loss_range":
            low = divergence.select_candidates(scores, mask & ~high, count=cfg.topd.low_loss_probes,
                                               mode="low", generator=gen)
        t = time.perf_counter()
        if low is None:
            high_w, low_w = await self.probe_windows(batch, high), None
        else:  # separate requests, each its own batch on a built-in server: the same windows, in parallel
            high_w, low_w = await asyncio.gather(self.probe_windows(batch, high),
                                                 self.probe_windows(batch, low, low=True))
        stats["probing_s"] = time.perf_counter() - t
        stats["n_candidates"] = int(high_w.seq_index.numel())
        probe_tokens = sum(int(w.teacher_mask.sum() + w.student_mask.sum()) for w in (high_w, low_w) if w is not None)
        stats["tokens_generated"] = stats.get("tokens_generated", 0) + probe_tokens
        if high_w.seq_index.numel() == 0:
            batch.marked = [torch.zeros(len(s), dtype=torch.bool) for s in batch.selection_score]
            return
        t = time.perf_counter()
        for w in (high_w, low_w):
            if w is not None and w.seq_index.numel():
                self.solve(w, stats)
        stats["ot_s"] = time.perf_counter() - t
        false_alarm = divergence.label_false_alarms(
            high_w.d_ot, method=cfg.topd.false_alarm, q=cfg.topd.false_alarm_quantile,
            threshold=cfg.topd.false_alarm_threshold,
            low_loss_d_ot=None if low_w is None else low_w.d_ot)
        if cfg.topd.mode == "opd_dw_high_ot":
            marked_c = divergence.matched_high_ot(high_w.d_ot, int(false_alarm.sum()),
                                                  q=cfg.topd.false_alarm_quantile, generator=gen)
        else:
            marked_c = false_alarm
        batch.candidate_d_ot, batch.candidate_false_alarm = high_w.d_ot, false_alarm
        batch.low_loss_d_ot = None if low_w is None else low_w.d_ot
        batch.marked = [torch.zeros(len(s), dtype=torch.bool) for s in batch.selection_score]
        for b, pos, m in zip(high_w.seq_index.tolist(), high_w.position.tolist(), marked_c.tolist()):
            if m:
                batch.marked[b][pos - batch.prompt_lens[b]] = True
        if cfg.topd.mode == "topd":
            keep = ~false_alarm
            batch.windows = Windows(**{f.name: getattr(high_w, f.name)[keep] for f in dataclasses.fields(Windows)})
        stats["false_alarm_frac"] = float(false_alarm.float().mean())

    async def probe_windows(self, batch: Batch, selected, *, low: bool = False) -> Windows:
        """Teacher and student K-token continuations from the same student prefix x_<t (t included); each
        window has its own run-unique seed (`low`: the low-loss probes' seed streams).

        Cost: one batched request per model (per 64 prefixes), both models at once. The prefixes come in
        rollout order, so those of one rollout share a request and a built-in server prefills that rollout
        once for all of them (hf_engine.shared_prefixes); SGLang's radix cache does the same across requests."""
        k = self.cfg.topd.window
        seq_idx, resp_pos = selected.nonzero(as_tuple=True)
        positions = torch.tensor([batch.prompt_lens[b] + r for b, r in zip(seq_idx.tolist(), resp_pos.tolist())],
                                 dtype=torch.long)
        prefixes = [batch.sequences[b][:t] for b, t in zip(seq_idx.tolist(), positions.tolist())]
        empty = torch.zeros(0, k, dtype=torch.long)
        if not prefixes:
            return Windows(seq_idx, positions, empty, empty.bool(), empty, empty.bool(),
                           torch.zeros(0, k, k), torch.zeros(0))
        params = SamplingParams(max_new_tokens=k, temperature=self.cfg.topd.probe_temperature,
                                stop_token_ids=(self.eos_id,))
        t_stream, s_stream = ((seeds.PROBE_TEACHER_LOW, seeds.PROBE_STUDENT_LOW) if low
                              else (seeds.PROBE_TEACHER, seeds.PROBE_STUDENT))

        def window_seeds(stream):
            return [row[0] for row in seeds.seed_grid(self.cfg.train.seed, stream, batch.step, len(prefixes))]
        t_comp, s_comp = await asyncio.gather(
            self.teacher.continue_from(prefixes, k, params, seeds=window_seeds(t_stream)),
            self.student.continue_from(prefixes, k, params, seeds=window_seeds(s_stream)))
        t_ids, t_mask = _pad_windows(t_comp, k, self.pad_id)
        s_ids, s_mask = _pad_windows(s_comp, k, self.pad_id)
        return Windows(seq_idx, positions, t_ids, t_mask, s_ids, s_mask, torch.zeros(0), torch.zeros(0))

    def solve(self, w: Windows, stats: dict | None = None) -> Windows:
        """Fills w.plan and w.d_ot (float32, CPU); solver diagnostics go into `stats`."""
        result = window_ot(self.embedding, w.teacher_ids, w.teacher_mask, w.student_ids, w.student_mask, self.cfg)
        w.plan, w.d_ot = result.plan.float().cpu(), result.distance.float().cpu()
        if stats is not None:
            stats["sinkhorn_iters"] = int(result.n_iter) if result.n_iter is not None else 0
            err = result.marginal_err
            stats["sinkhorn_marginal_err"] = float(err.max()) if torch.is_tensor(err) else float(err or 0.0)
        return w


def window_ot(embedding, teacher_ids, teacher_mask, student_ids, student_mask, cfg):
    """OT between teacher and student windows (M, K) with the config's ground cost and solver -> OTResult.
    Costs and Sinkhorn run on the table's device (`train.ot_table` puts it on the trainer's: the kernel on CUDA)."""
    from topd_ds.ot import ot_distance
    from topd_ds.ot.cost import position_cost, token_cost

    cost = token_cost(embedding, teacher_ids, student_ids, metric=cfg.topd.cost)  # (M, K, K)
    if cfg.topd.position_cost > 0:  # beyond the paper: order-aware matches (D_OT then measures order too)
        cost = cost + position_cost(cost.shape[1], cost.shape[2], cfg.topd.position_cost, cost.device)
    opts = dict(eps=cfg.ot.eps, max_iter=cfg.ot.max_iter, tol=cfg.ot.tol) if cfg.ot.solver == "sinkhorn" else {}
    return ot_distance(cost, mask_a=teacher_mask, mask_b=student_mask, solver=cfg.ot.solver, **opts)


def stack_ragged(rows):
    """Per-sequence 1-D tensors -> (B, R_max) padded with zeros and a bool mask."""
    n = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), n)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = True
    return out, mask
