"""The pipeline against built-in servers: what it hands the trainer equals a direct float64 recomputation."""

import os

import pytest
import torch
import yaml

from topd_ds.rollout import divergence
from topd_ds.config import config_from_dict
from topd_ds.engines.launch import launch_server
from topd_ds.engines.sglang import SGLangClient
from topd_ds.ot import exact_ot, token_cost
from topd_ds.rollout.pipeline import Pipeline, stack_ragged
from topd_ds.rollout.selection import teacher_logprobs_from_topk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def servers(tiny_models):
    with launch_server(tiny_models[0]) as teacher, launch_server(tiny_models[1]) as student:
        yield student.url, teacher.url


@pytest.fixture(scope="module")
def hf(tiny_models):
    from transformers import AutoModelForCausalLM

    return [AutoModelForCausalLM.from_pretrained(d).double().eval() for d in tiny_models]


@pytest.fixture(scope="module")
def refusing_teacher(tiny_models):
    """The tiny teacher behind a built-in server that answers 400 to any request with return_hidden_states (as
    SGLang 0.5.23 started without --enable-return-hidden-states)."""
    with launch_server(tiny_models[0], hidden_states=False) as teacher:
        yield teacher.url


def make_pipeline(servers, hf, mode, *, teacher_cfg=None, opd=None, **topd):
    teacher = hf[0]
    cfg = config_from_dict({
        "model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
        "teacher": teacher_cfg or {}, "opd": opd or {},
        "rollout": {"n_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 10},
        "topd": {"mode": mode, "window": 5, "candidate_fraction": 0.3, **topd},
        "ot": {"solver": "exact"}, "pipeline": {"max_staleness": 0},
        "train": {"global_batch_size": 4, "micro_batch_size": 4, "seed": 3}}, check_paths=False)

    async def clients():
        return SGLangClient([servers[0]]), SGLangClient([servers[1]])

    head = teacher.get_output_embeddings().weight.detach().float()
    emb = teacher.get_input_embeddings().weight.detach().float()
    prompts = [[1, 9, 14, 10, 19], [1, 12, 16, 7, 18, 19], [1, 5, 13, 6, 19]]
    return Pipeline(prompts=prompts, make_clients=clients, teacher_head=head, embedding=emb, cfg=cfg,
                    start_step=0, eos_id=2, pad_id=0, weight_version=0, produce=False)


def test_scoring_and_selection_equal_a_direct_forward(servers, hf):
    teacher, student = hf
    pipe = make_pipeline(servers, hf, "opd")
    try:
        batch = pipe.call(pipe.build(0, 0))
    finally:
        pipe.close()
    assert len(batch.sequences) == 4 and batch.windows is None
    for seq, p, hidden, score in zip(batch.sequences, batch.prompt_lens, batch.teacher_hidden, batch.selection_score):
        ids = torch.tensor([seq])
        with torch.no_grad():
            out = teacher(input_ids=ids, output_hidden_states=True)
            lt = torch.log_softmax(out.logits[0], -1)
            ls = torch.log_softmax(student(input_ids=ids).logits[0], -1)
        ref_hidden = out.hidden_states[-1][0, p - 1:len(seq) - 1]
        assert torch.allclose(hidden.double(), ref_hidden, atol=1e-4)
        # vocab 20 <= top_k 20: the selection score is the exact reverse KL at every response token
        ref = (ls.exp() * (ls - lt)).sum(-1)[p - 1:len(seq) - 1]
        assert torch.allclose(score.double(), ref, atol=1e-4), (score, ref)


def test_same_step_same_batch(servers, hf):
    """Rollouts are seeded by (seed, step): a resumed run regenerates the same batch."""
    pipe = make_pipeline(servers, hf, "opd")
    try:
        a = pipe.call(pipe.build(4, 0))
        b = pipe.call(pipe.build(4, 0))
        c = pipe.call(pipe.build(5, 0))
    finally:
        pipe.close()
    assert a.sequences == b.sequences
    assert a.sequences != c.sequences or a.prompt_lens != c.prompt_lens


def test_topd_windows_plans_and_labels(servers, hf):
    teacher, _ = hf
    pipe = make_pipeline(servers, hf, "topd", probe_temperature=1e-4)
    try:
        batch = pipe.call(pipe.build(1, 0))
    finally:
        pipe.close()
    d_ot, fa = batch.candidate_d_ot, batch.candidate_false_alarm
    n_cand = sum(max(1, round(0.3 * (len(s) - p))) for s, p in zip(batch.sequences, batch.prompt_lens))
    assert d_ot.numel() == n_cand
    # bottom 30% of the candidates' D_OT are false alarms; the rest become trajectory windows
    assert int(fa.sum()) == pytest.approx(0.3 * n_cand, abs=1.0)
    assert bool((d_ot[fa].max() <= d_ot[~fa].min()) if fa.any() and (~fa).any() else True)
    w = batch.windows
    assert w.seq_index.numel() == int((~fa).sum())
    emb = teacher.get_input_embeddings().weight.detach().float()
    cost = token_cost(emb, w.teacher_ids, w.student_ids)
    plan, dist = exact_ot(cost, mask_a=w.teacher_mask, mask_b=w.student_mask)
    assert torch.allclose(w.d_ot.double(), dist.double(), atol=1e-5)
    for m in range(w.seq_index.numel()):
        tm, sm = w.teacher_mask[m], w.student_mask[m]
        assert torch.allclose(w.plan[m].sum(1)[tm], torch.full((int(tm.sum()),), 1 / int(tm.sum())), atol=1e-5)
        assert float(w.plan[m][~tm].abs().sum() + w.plan[m][:, ~sm].abs().sum()) == 0.0
        # the teacher window is the teacher's continuation of this exact prefix: probed at temperature 1e-4,
        # the greedy decode of a direct forward, token by token (up to a near-tie, where either is greedy)
        ctx = batch.sequences[int(w.seq_index[m])][:int(w.position[m])]
        for i, tok in enumerate(w.teacher_ids[m][tm].tolist()):
            with torch.no_grad():
                top2 = teacher(input_ids=torch.tensor([ctx])).logits[0, -1].topk(2)
            if float(top2.values[0] - top2.values[1]) < 1e-3:
                break
            assert tok == int(top2.indices[0]), (m, i, ctx, tok, top2)
            ctx = ctx + [tok]
    # marked tokens are exactly the false alarms, at their response positions
    marked = sum(int(m.sum()) for m in batch.marked)
    assert marked == int(fa.sum())


def test_seeded_batch_gives_each_prompt_its_own_stream(servers):
    """With one seed per call, two copies of a prompt must not sample the same tokens (and a repeat of the
    call reproduces both)."""
    import asyncio

    from topd_ds.engines.protocol import SamplingParams

    async def run():
        client = SGLangClient([servers[0]])
        try:
            p = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True, seed=11)
            return (await client.generate([[1, 9, 14], [1, 9, 14]], p, n=2),
                    await client.generate([[1, 9, 14], [1, 9, 14]], p, n=2))
        finally:
            await client.close()

    first, again = asyncio.run(run())
    ids = [c.output_ids for group in first for c in group]
    assert len({tuple(x) for x in ids}) == 4
    assert ids == [c.output_ids for group in again for c in group]


class _TimedPipeline(Pipeline):
    """build() only sleeps and records when each step's build ran; no servers."""

    def __init__(self, max_staleness, build_s=0.05, fail_at=None):
        class _Client:
            async def close(self):
                pass

        async def clients():
            return _Client(), _Client()

        cfg = config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                                "pipeline": {"max_staleness": max_staleness, "queue_size": 2}}, check_paths=False)
        self.events, self.build_s, self.fail_at = [], build_s, fail_at  # ("start" | "end", step) in order
        super().__init__(prompts=[[1]], make_clients=clients, teacher_head=None, embedding=None, cfg=cfg,
                         start_step=0, eos_id=2, pad_id=0, weight_version=0)

    async def build(self, step, version):
        import asyncio

        from topd_ds.rollout.batch import Batch

        self.events.append(("start", step))
        await asyncio.sleep(self.build_s * (2 if step % 2 == 0 else 1))  # even steps slower: order must still hold
        if step == self.fail_at:
            raise ValueError(f"build {step} failed")
        self.events.append(("end", step))
        return Batch(step=step, weight_version=version, sequences=[], prompt_lens=[], stats={})


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_producer_overlaps_builds_within_the_staleness_cap(max_staleness):
    """max_staleness=1: build(k+1) starts once version k is published, before build(k) ends; batches still
    come out in step order with version >= step - cap. max_staleness=0: builds never overlap."""
    pipe = _TimedPipeline(max_staleness).start()
    try:
        got = []
        for step in range(6):
            batch = pipe.get(timeout=10)
            got.append((batch.step, batch.weight_version))
            pipe.publish_version(step + 1)  # the trainer trained `batch` and synced its weights
    finally:
        pipe.close()
    assert [s for s, _ in got] == list(range(6))
    assert all(v >= s - max_staleness for s, v in got), got
    # overlap by event order, not wall-clock: build k+1 started before build k ended
    at = {e: i for i, e in enumerate(pipe.events)}
    overlaps = sum(at[("start", k + 1)] < at[("end", k)] for k in range(5))
    if max_staleness == 0:
        assert overlaps == 0, pipe.events
    else:
        assert overlaps >= 3, pipe.events


def test_producer_failure_surfaces_in_get():
    pipe = _TimedPipeline(1, build_s=0.01, fail_at=2).start()
    try:
        with pytest.raises(ValueError, match="build 2 failed"):
            for step in range(5):
                pipe.get(timeout=10)
                pipe.publish_version(step + 1)
    finally:
        pipe.close()


class _SeedRecorder(SGLangClient):
    """Records the seed of every sample as SGLang sees it: an item's n samples share its sampling_seed
    (sgl-project/sglang PR 28805), so an item with n > 1 counts as n samples of one seed."""

    def __init__(self, url, log):
        super().__init__([url])
        self.log = log

    async def _generate_call(self, payload, expected):
        sps = payload["sampling_params"]
        items = len(payload["input_ids"])
        for sp in (sps if isinstance(sps, list) else [sps] * items):
            if sp.get("temperature", 1.0) > 0:
                assert "sampling_seed" in sp, "a sampled item without a seed is not reproducible"
                self.log += [sp["sampling_seed"]] * sp.get("n", 1)
        return await super()._generate_call(payload, expected)


def test_no_two_samples_of_a_run_share_a_seed(servers, hf):
    """Rollouts (2 prompts x 2 samples) and teacher/student probes of 4 TOPD steps: every sampled sequence
    got its own seed, and a rebuilt step sends the same seeds again."""
    log = []
    pipe = make_pipeline(servers, hf, "topd", false_alarm="low_loss_range", low_loss_probes=2)

    async def recorders():
        return _SeedRecorder(servers[0], log), _SeedRecorder(servers[1], log)
    pipe.student, pipe.teacher = pipe.call(recorders())
    try:
        for step in range(4):
            pipe.call(pipe.build(step, 0))
        first = list(log)
        pipe.call(pipe.build(2, 0))
    finally:
        pipe.close()
    assert len(first) > 4 * 4 and len(set(first)) == len(first), sorted(first)
    assert set(log[len(first):]) <= set(first)


def test_probe_windows_equal_one_request_per_prefix(servers, hf):
    """The pipeline's probes (both models at once, every prefix of a batch in one request, one prefill per
    rollout on the built-in server) equal each prefix sent alone with its window seed; the same check with
    the seeds moved by one prefix fails, so a seed or row mix-up would be seen."""
    from topd_ds.rollout import seeds
    from topd_ds.engines.protocol import SamplingParams

    pipe = make_pipeline(servers, hf, "opd")
    try:
        batch = pipe.call(pipe.build(2, 0))
        selected = torch.zeros(len(batch.sequences), max(len(s) - p for s, p in zip(batch.sequences, batch.prompt_lens)),
                               dtype=torch.bool)
        for b, (s, p) in enumerate(zip(batch.sequences, batch.prompt_lens)):
            selected[b, :len(s) - p:2] = True            # every other response position: shared prefixes
        w = pipe.call(pipe.probe_windows(batch, selected))
        prefixes = [batch.sequences[b][:t] for b, t in zip(w.seq_index.tolist(), w.position.tolist())]
        params = SamplingParams(max_new_tokens=5, temperature=1.0, stop_token_ids=(2,))

        def alone(client, stream, shift=0):
            sd = [s[0] for s in seeds.seed_grid(3, stream, batch.step, len(prefixes))]
            sd = sd[shift:] + sd[:shift]
            comps = [pipe.call(client.continue_from([p], 5, params, seeds=[s])) for p, s in zip(prefixes, sd)]
            return [c[0].output_ids for c in comps]

        def ids(t, m):
            return [row[mask].tolist() for row, mask in zip(t, m)]
        assert len(prefixes) >= 8
        assert ids(w.teacher_ids, w.teacher_mask) == alone(pipe.teacher, seeds.PROBE_TEACHER)
        assert ids(w.student_ids, w.student_mask) == alone(pipe.student, seeds.PROBE_STUDENT)
        assert ids(w.student_ids, w.student_mask) != alone(pipe.student, seeds.PROBE_STUDENT, shift=1)
    finally:
        pipe.close()


def test_teacher_logprobs_from_topk_equals_brute_force():
    """The selection's teacher logprobs from a top-k answer: exact at ids in the teacher's top-k, the k-th logprob
    elsewhere, and exactly the full-vocabulary values when k = V."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    R, V, k_s = 40, 30, 8
    lp = torch.log_softmax(3 * torch.randn(R, V, generator=g, dtype=torch.float64), -1)      # (R, V) teacher
    s_ids = torch.stack([torch.randperm(V, generator=g)[:k_s] for _ in range(R)])          # (R, k_s) student ids
    for k_t in (V, 5):
        t_lp, t_ids = lp.topk(k_t, -1)
        got = teacher_logprobs_from_topk(s_ids, t_ids, t_lp)
        for r in range(R):
            listed = dict(zip(t_ids[r].tolist(), t_lp[r].tolist()))
            floor = min(listed.values())
            want = [listed.get(v, floor) for v in s_ids[r].tolist()]
            assert got[r].tolist() == want, (k_t, r)
        if k_t == V:
            assert torch.equal(got, lp.gather(-1, s_ids))


def selected(batch, cfg):
    """The high-loss candidates of a batch as (B, R) bools: the selection the pipeline probes (same generator)."""
    scores, mask = stack_ragged(batch.selection_score)
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + batch.step)
    return divergence.select_candidates(scores, mask, fraction=cfg.topd.candidate_fraction, mode="high", generator=gen)


def test_local_scoring_selects_the_hidden_state_paths_candidates(servers, refusing_teacher, hf):
    """teacher.scoring local: the teacher server is asked for its top-k only (it refuses hidden states here) and,
    with the tiny vocabulary (20) <= opd.top_k (20), the selection scores and candidates equal today's path from
    the teacher's hidden states; the batch carries no teacher hidden states (the trainer's ranks compute them)."""
    ref_pipe = make_pipeline(servers, hf, "topd")
    local_pipe = make_pipeline((servers[0], refusing_teacher), hf, "topd", teacher_cfg={"scoring": "local"})
    try:
        assert hf[0].config.vocab_size <= local_pipe.cfg.opd.top_k
        for step in (0, 1):
            ref = ref_pipe.call(ref_pipe.build(step, 0))
            got = local_pipe.call(local_pipe.build(step, 0))
            assert got.sequences == ref.sequences
            assert got.teacher_hidden is None and got.teacher_topk_ids is None and ref.teacher_hidden is not None
            for a, b in zip(got.selection_score, ref.selection_score):
                assert torch.allclose(a, b, atol=1e-5), (a, b)
            cand = selected(got, local_pipe.cfg)
            assert cand.any() and torch.equal(cand, selected(ref, ref_pipe.cfg))
            assert torch.equal(got.windows.seq_index, ref.windows.seq_index)
            assert torch.equal(got.windows.position, ref.windows.position)
            for a, b in zip(got.teacher_token_logprobs, ref.teacher_token_logprobs):
                assert torch.allclose(a, b, atol=1e-5)
        # the refusing server does refuse: today's server scoring against it fails at its first request
        from topd_ds.errors import RequestRejected

        bad = make_pipeline((servers[0], refusing_teacher), hf, "topd")
        try:
            with pytest.raises(RequestRejected, match="return_hidden_states"):
                bad.call(bad.build(0, 0))
        finally:
            bad.close()
    finally:
        ref_pipe.close()
        local_pipe.close()


def test_paper_configs_scoring_asks_the_teacher_for_no_hidden_states(servers, refusing_teacher, hf):
    """The paper configs' teacher / opd / topd choices, on tiny models: stage 2 TOPD batches (rollouts, scoring,
    probing, OT, labels) are built against a teacher server that fails any return_hidden_states request."""
    for name in ("topd.yaml", "opd.yaml"):
        with open(os.path.join(REPO, "configs", "qwen3_30b_a3b_to_4b", name)) as f:
            paper = yaml.safe_load(f)
        assert paper["teacher"]["scoring"] == "local", name
        mode = paper.get("topd", {}).get("mode", "opd")
        pipe = make_pipeline((servers[0], refusing_teacher), hf, mode, teacher_cfg=paper["teacher"],
                             opd={"estimator": paper["opd"]["estimator"]})
        try:
            batch = pipe.call(pipe.build(2, 0))
        finally:
            pipe.close()
        assert batch.teacher_hidden is None and len(batch.selection_score) == 4
        if mode == "topd":
            assert batch.candidate_d_ot is not None and batch.candidate_d_ot.numel() > 0


def test_stage1_with_local_scoring_asks_the_teacher_server_for_nothing_it_refuses(tiny_models, refusing_teacher,
                                                                                 tmp_path):
    """Stage 1 with the paper configs' teacher.scoring (local), on tiny models: `topd-ds sample` and the training run
    use a teacher server that fails any return_hidden_states request; the run trains (the teacher's distribution
    comes from the local teacher on the rank)."""
    from topd_ds.stage1.sample import main as sample_main
    from topd_ds.tasks.arith import make_splits, write_jsonl
    from topd_ds.train import main

    with open(os.path.join(REPO, "configs", "qwen3_30b_a3b_to_4b", "stage1_kd.yaml")) as f:
        paper = yaml.safe_load(f)
    assert paper["teacher"]["scoring"] == "local" and paper["kd"].get("kd_ratio", 0.5) > 0
    train, _ = make_splits(16, 4, seed=5, depth=2)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    cfg = {"model": {"teacher": tiny_models[0], "student": tiny_models[1]}, "teacher": paper["teacher"],
           "data": {"prompts": str(tmp_path / "train.jsonl"), "responses": str(tmp_path / "kd.jsonl"),
                    "max_prompt_tokens": 64},
           "teacher_server": {"urls": [refusing_teacher]},
           "kd": {"n_samples": 4, "max_new_tokens": 8, "kd_ratio": 0.5},
           "train": {"stage": "kd", "deepspeed_config": os.path.join(REPO, "ds_configs/zero3.json"), "steps": 2,
                     "lr": 1e-2, "global_batch_size": 2, "micro_batch_size": 2, "out_dir": str(tmp_path / "runs"),
                     "run_name": "kd-local"}}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert sample_main(["--config", str(path)]) == 0
    assert main(["--config", str(path)]) == 0
    import json

    with open(tmp_path / "runs" / "kd-local" / "summary.json") as f:
        history = json.load(f)["history"]
    assert [h["step"] for h in history] == [1, 2] and all(h["loss/kd"] > 0 for h in history)
