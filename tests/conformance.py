"""Conformance suite: one set of checks for any server speaking SGLang's native API.

Each `check_*(url, model_dir, ...)` talks to a running server over plain HTTP and compares its answers
with an independent reference: a float32 transformers forward of the same model directory, run here.
tests/test_engines_conformance.py runs them against the built-in server (make test) or, with
TOPD_CONFORMANCE_URL / TOPD_CONFORMANCE_MODEL set, against real SGLang (make test-sglang).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import urllib.error
import urllib.request

import numpy as np
import torch

LOGPROB_TOL = 1e-4
HIDDEN_TOL = 1e-4
FIRST_TOKEN = 3          # ids below are the specials of the char tokenizer; prompts use ids >= 3


def call(url: str, path: str, body=None, *, method: str | None = None, raw: bytes | None = None, timeout=120):
    """(status, parsed JSON or text) of one HTTP call; 4xx/5xx are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def server_weight_version(url) -> str:
    """/get_weight_version where it exists (the built-in server), else /model_info's field
    (SGLang 0.5.23 has no /get_weight_version)."""
    status, ans = call(url, "/get_weight_version")
    if status != 200:
        status, ans = call(url, "/model_info")
    assert status == 200 and isinstance(ans["weight_version"], str), (status, ans)
    return ans["weight_version"]


def generate(url, body):
    status, answer = call(url, "/generate", body)
    assert status == 200, f"/generate answered {status}: {answer}"
    return answer


@functools.lru_cache(maxsize=4)
def reference(model_dir: str):
    """The same model in float32 transformers, eval mode (the reference for every number)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def ref_logprobs(model, seq):
    """(L, V) float64 log-softmax of the unpadded forward; row t predicts seq[t + 1]."""
    return torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)


@torch.no_grad()
def ref_hidden(model, seq):
    """(L, H) final hidden states (after the last norm) of the unpadded forward."""
    return model.get_decoder()(input_ids=torch.tensor([seq])).last_hidden_state[0]


def random_prompts(model_dir, count, *, lo=2, hi=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = reference(model_dir).config.vocab_size
    lens = torch.randint(lo, hi + 1, (count,), generator=g).tolist()
    return [torch.randint(FIRST_TOKEN, V, (n,), generator=g).tolist() for n in lens]


def assert_schema(item, prompt, *, logprobs: bool):
    assert isinstance(item, dict), f"answer item is {type(item).__name__}"
    assert isinstance(item["output_ids"], list) and all(isinstance(t, int) for t in item["output_ids"])
    meta = item["meta_info"]
    assert meta["prompt_tokens"] == len(prompt), (meta["prompt_tokens"], len(prompt))
    assert meta["completion_tokens"] == len(item["output_ids"])
    assert isinstance(meta["weight_version"], str)
    fr = meta["finish_reason"]
    assert fr["type"] in ("stop", "length"), fr
    if fr["type"] == "length":
        assert fr["length"] == len(item["output_ids"]), fr
    else:
        assert fr["matched"] == item["output_ids"][-1], fr
    if logprobs:
        out = meta["output_token_logprobs"]
        assert len(out) == len(item["output_ids"])
        assert [e[1] for e in out] == item["output_ids"]
        assert all(math.isfinite(e[0]) and e[0] <= 0 for e in out)


# ---- the checks ------------------------------------------------------------------------------------
def check_health_and_info(url, model_dir):
    assert call(url, "/health")[0] == 200
    assert call(url, "/health_generate")[0] == 200
    status, info = call(url, "/get_model_info")
    assert status == 200 and info["is_generation"] is True and "model_path" in info
    status, info = call(url, "/model_info")
    assert status == 200 and info["is_generation"] is True and isinstance(info["weight_version"], str)
    assert server_weight_version(url) == info["weight_version"]
    assert call(url, "/flush_cache", {})[0] == 200


def check_generate_schema(url, model_dir):
    prompts = random_prompts(model_dir, 3, seed=1)
    sp = {"max_new_tokens": 5, "temperature": 1.0}
    single = generate(url, {"input_ids": prompts[0], "sampling_params": sp, "return_logprob": True})
    assert_schema(single, prompts[0], logprobs=True)
    batch = generate(url, {"input_ids": prompts, "sampling_params": sp, "return_logprob": True})
    assert isinstance(batch, list) and len(batch) == 3
    for item, p in zip(batch, prompts):
        assert_schema(item, p, logprobs=True)
        assert len(item["output_ids"]) <= 5
    plain = generate(url, {"input_ids": prompts[1], "sampling_params": sp})
    assert_schema(plain, prompts[1], logprobs=False)


def check_logprobs_match_forward(url, model_dir):
    """Prompt and output logprobs of a padded batch == an unpadded float32 forward, to 1e-4."""
    model = reference(model_dir)
    prompts = random_prompts(model_dir, 4, lo=2, hi=14, seed=2)
    batch = generate(url, {"input_ids": prompts, "return_logprob": True, "logprob_start_len": 0,
                           "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True}})
    for item, p in zip(batch, prompts):
        seq = p + item["output_ids"]
        ref = ref_logprobs(model, seq)
        inp = item["meta_info"]["input_token_logprobs"]
        assert len(inp) == len(p) and inp[0][0] is None and inp[0][1] == p[0]
        got = [e[0] for e in inp[1:]] + [e[0] for e in item["meta_info"]["output_token_logprobs"]]
        want = [ref[t - 1, seq[t]].item() for t in range(1, len(seq))]
        err = max(abs(a - b) for a, b in zip(got, want))
        assert len(got) == len(want) and err < LOGPROB_TOL, f"max logprob error {err}"
    # a start in the middle: entries cover positions s..L-1 and the first one is null
    p = prompts[0] + prompts[1]
    s = len(p) // 2
    item = generate(url, {"input_ids": p, "return_logprob": True, "logprob_start_len": s,
                          "sampling_params": {"max_new_tokens": 1}})
    inp = item["meta_info"]["input_token_logprobs"]
    ref = ref_logprobs(model, p)
    assert len(inp) == len(p) - s and inp[0][0] is None
    # SGLang 0.5.23 reports prompt ids >= vocab_size - 1 as 0 here (its scheduler clips "padded
    # image-token hashes"); the logprob is still that of the real token, checked below
    V = model.config.vocab_size
    assert all(e[1] == t or (t >= V - 1 and e[1] == 0) for e, t in zip(inp, p[s:])), [e[1] for e in inp]
    assert max(abs(e[0] - ref[s + j - 1, p[s + j]].item()) for j, e in enumerate(inp) if j) < LOGPROB_TOL


def check_topk_consistent(url, model_dir, k=5):
    """Top-k per position == the k largest of the full softmax, sorted, ids matching their values."""
    model = reference(model_dir)
    p = random_prompts(model_dir, 1, lo=6, hi=10, seed=3)[0]
    item = generate(url, {"input_ids": p, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k,
                          "sampling_params": {"max_new_tokens": 3, "temperature": 1.0, "ignore_eos": True}})
    meta = item["meta_info"]
    seq = p + item["output_ids"]
    ref = ref_logprobs(model, seq)
    tops = meta["input_top_logprobs"]
    assert len(tops) == len(p) and tops[0] is None
    rows = tops[1:] + meta["output_top_logprobs"]                           # predict seq[1:]
    assert len(rows) == len(seq) - 1
    for t, row in enumerate(rows):
        vals = [e[0] for e in row]
        assert len(row) == k and vals == sorted(vals, reverse=True)
        want = ref[t].topk(k).values.tolist()
        assert max(abs(a - b) for a, b in zip(vals, want)) < LOGPROB_TOL
        assert max(abs(ref[t, e[1]].item() - e[0]) for e in row) < LOGPROB_TOL
        assert len({e[1] for e in row}) == k
    for e, row in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert e[0] <= row[0][0] + 1e-6


def decode_flat_top(meta, positions: int, k: int):
    """SGLang 0.5.23's flat input top-k fields -> (values (rows, k) float64, ids (rows, k) int64, null_prefix);
    base64 of little-endian arrays (dtype fields) or flat lists. Written here from SGLang's docstring
    (tokenizer_manager._build_flat_top_logprobs_fields), independently of the client's parser."""
    import base64

    rows, width = meta["input_top_logprobs_shape"]
    null = meta["input_top_logprobs_null_prefix"]
    assert width == k and null + rows == positions, (meta["input_top_logprobs_shape"], null, positions, k)
    out = []
    for name in ("val", "idx"):
        key = f"input_top_logprobs_{name}_flat"
        if key + "_b64" in meta:
            dtype = {"float32": "<f4", "int32": "<i4", "int64": "<i8", "float64": "<f8"}[meta[key + "_b64_dtype"]]
            arr = np.frombuffer(base64.b64decode(meta[key + "_b64"]), dtype=dtype)
        else:
            arr = np.asarray(meta[key])
        assert arr.size == rows * k, (key, arr.size, rows, k)
        out.append(torch.from_numpy(arr.reshape(rows, k).copy()))
    return out[0].double(), out[1].long(), null


def check_flat_top_logprobs(url, model_dir, k=4):
    """return_flat_raw_top_logprobs (+ _b64): the prompt top-k as flat arrays after a null prefix, equal to the
    nested input_top_logprobs of the same request shape and to the forward's k largest logprobs (the selection's
    request with teacher.scoring local; SGLang 0.5.23 GenerateReqInput)."""
    model = reference(model_dir)
    prompts = random_prompts(model_dir, 3, lo=6, hi=14, seed=4)
    starts = [len(p) // 2 for p in prompts]
    body = {"input_ids": prompts, "return_logprob": True, "logprob_start_len": starts, "top_logprobs_num": k,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
    nested = generate(url, body)
    for b64 in (True, False):
        flat = generate(url, {**body, "return_flat_raw_top_logprobs": True, "return_flat_raw_top_logprobs_b64": b64})
        for item, want_item, p, s in zip(flat, nested, prompts, starts):
            meta = item["meta_info"]
            assert "input_top_logprobs" not in meta or not meta["input_top_logprobs"], "flat replaces nested"
            vals, ids, null = decode_flat_top(meta, len(p) - s, k)
            assert null == 1                                   # position s has no prediction, as in nested
            tops = want_item["meta_info"]["input_top_logprobs"][null:]
            assert (vals - torch.tensor([[e[0] for e in row] for row in tops], dtype=torch.float64)).abs().max() < LOGPROB_TOL
            ref = ref_logprobs(model, p)[s:len(p) - 1]          # rows predicting p[s + 1:]
            assert (vals - ref.topk(k, -1).values).abs().max() < LOGPROB_TOL
            assert (ref.gather(-1, ids) - vals).abs().max() < LOGPROB_TOL   # each id carries its own logprob
            assert all(len(set(r)) == k for r in ids.tolist())


def check_hidden_states(url, model_dir):
    """meta_info.hidden_states = [prompt block (L, H), one (H,) per decode step] == the model's final ones."""
    model = reference(model_dir)
    prompts = random_prompts(model_dir, 2, lo=3, hi=9, seed=4)
    batch = generate(url, {"input_ids": prompts, "return_hidden_states": True, "return_logprob": True,
                           "sampling_params": {"max_new_tokens": 4, "temperature": 1.0, "ignore_eos": True}})
    H = model.config.hidden_size
    for item, p in zip(batch, prompts):
        hs = item["meta_info"]["hidden_states"]
        block = torch.tensor(hs[0])
        assert block.shape == (len(p), H), block.shape
        steps = torch.tensor(hs[1:]).reshape(-1, H)
        assert steps.shape[0] == len(item["output_ids"]) - 1          # the last sampled token is never fed
        seq = p + item["output_ids"]
        ref = ref_hidden(model, seq)
        got = torch.cat([block, steps])
        err = (got - ref[:got.shape[0]]).abs().max().item()
        assert err < HIDDEN_TOL, f"max hidden-state error {err}"
        # and the logits rebuilt from them with the lm_head give the reported logprobs
        lp = torch.log_softmax(model.get_output_embeddings()(ref[len(p) - 1:len(seq) - 1]).double(), -1)
        want = lp.gather(-1, torch.tensor(item["output_ids"])[:, None]).squeeze(-1)
        got_lp = torch.tensor([e[0] for e in item["meta_info"]["output_token_logprobs"]], dtype=torch.float64)
        assert (want - got_lp).abs().max().item() < LOGPROB_TOL


def check_n_samples(url, model_dir):
    """n per prompt: B * n items, prompt-major; samples differ; greedy samples agree."""
    prompts = [random_prompts(model_dir, 1, lo=3, hi=3, seed=5)[0], random_prompts(model_dir, 1, lo=7, hi=7, seed=6)[0]]
    n = 3
    batch = generate(url, {"input_ids": prompts, "return_logprob": True,
                           "sampling_params": {"max_new_tokens": 12, "temperature": 1.0, "ignore_eos": True, "n": n}})
    assert isinstance(batch, list) and len(batch) == len(prompts) * n
    for i, p in enumerate(prompts):
        group = batch[i * n:(i + 1) * n]
        for item in group:
            assert_schema(item, p, logprobs=True)
            assert len(item["output_ids"]) == 12
        assert len({tuple(item["output_ids"]) for item in group}) > 1, "n samples are all identical"
    greedy = generate(url, {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 8, "temperature": 0.0,
                                                                           "ignore_eos": True, "n": 2}})
    assert isinstance(greedy, list) and len(greedy) == 2 and greedy[0]["output_ids"] == greedy[1]["output_ids"]


def check_stop_and_eos(url, model_dir):
    """stop_token_ids end a completion at the first hit (kept last); EOS too; ignore_eos disables both."""
    model = reference(model_dir)
    eos = model.config.eos_token_id
    sp = {"max_new_tokens": 10, "temperature": 0.0}
    for seed in range(7, 40):                    # a prompt whose greedy run has >= 4 tokens before any EOS
        p = random_prompts(model_dir, 1, lo=4, hi=4, seed=seed)[0]
        toks = generate(url, {"input_ids": p, "sampling_params": sp})["output_ids"]
        if len(toks) >= 4 and eos not in toks[:4]:
            break
    stop = toks[3]
    first = toks.index(stop)
    item = generate(url, {"input_ids": p, "return_logprob": True, "sampling_params": {**sp, "stop_token_ids": [stop]}})
    assert item["output_ids"] == toks[:first + 1], (item["output_ids"], toks)
    assert item["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert len(item["meta_info"]["output_token_logprobs"]) == first + 1
    ignored = generate(url, {"input_ids": p, "sampling_params": {**sp, "stop_token_ids": [stop], "ignore_eos": True}})
    assert len(ignored["output_ids"]) == 10 and ignored["meta_info"]["finish_reason"]["type"] == "length"
    # EOS: sample many long completions; with ignore_eos none stops, without it EOS ends them
    prompts = random_prompts(model_dir, 8, lo=2, hi=6, seed=8)
    base = {"max_new_tokens": 40, "temperature": 1.5, "n": 2}
    free = generate(url, {"input_ids": prompts, "sampling_params": {**base, "ignore_eos": False}})
    stopped = [it for it in free if it["meta_info"]["finish_reason"]["type"] == "stop"]
    assert stopped, "no sample hit EOS in 16 x 40 tokens"
    for it in free:
        ids = it["output_ids"]
        assert eos not in ids[:-1]
        if it["meta_info"]["finish_reason"]["type"] == "stop":
            assert ids[-1] == eos and it["meta_info"]["finish_reason"]["matched"] == eos
        else:
            assert len(ids) == 40
    forced = generate(url, {"input_ids": prompts, "sampling_params": {**base, "ignore_eos": True}})
    assert all(len(it["output_ids"]) == 40 and it["meta_info"]["finish_reason"]["type"] == "length" for it in forced)


def perturbed_copy(model_dir, out_dir, *, seed=11, scale=0.05):
    """A copy of the model with every weight moved by seeded noise (the 'new weights' of an update)."""
    from transformers import AutoTokenizer

    from topd_ds.tasks.models import save_model

    model = reference(model_dir).__class__.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(scale * torch.randn(prm.shape, generator=g))
    return save_model(model, out_dir, AutoTokenizer.from_pretrained(model_dir)), model.eval()


def check_weight_update(url, model_dir, tmp_dir):
    """After /update_weights_from_disk the next answer carries the new version and the new logprobs."""
    new_dir, new_model = perturbed_copy(model_dir, os.path.join(tmp_dir, "updated"))
    p = random_prompts(model_dir, 1, lo=8, hi=8, seed=9)[0]
    body = {"input_ids": p, "return_logprob": True, "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 1}}
    try:
        status, ans = call(url, "/update_weights_from_disk", {"model_path": new_dir, "weight_version": "step-7"})
        assert status == 200 and ans["success"] is True, ans
        assert server_weight_version(url) == "step-7"
        item = generate(url, body)
        assert item["meta_info"]["weight_version"] == "step-7"
        ref_new, ref_old = ref_logprobs(new_model, p), ref_logprobs(reference(model_dir), p)
        got = [e[0] for e in item["meta_info"]["input_token_logprobs"][1:]]
        assert max(abs(g - ref_new[t, p[t + 1]].item()) for t, g in enumerate(got)) < LOGPROB_TOL
        assert max(abs(g - ref_old[t, p[t + 1]].item()) for t, g in enumerate(got)) > 1e-3
    finally:
        status, ans = call(url, "/update_weights_from_disk", {"model_path": model_dir, "weight_version": "restored"})
        assert status == 200 and ans["success"] is True, ans
    item = generate(url, body)
    assert item["meta_info"]["weight_version"] == "restored"
    got = [e[0] for e in item["meta_info"]["input_token_logprobs"][1:]]
    ref_old = ref_logprobs(reference(model_dir), p)
    assert max(abs(g - ref_old[t, p[t + 1]].item()) for t, g in enumerate(got)) < LOGPROB_TOL


def check_weight_update_in_memory(url, model_dir, tmp_dir, route):
    """SGLang 0.5.23's in-memory routes, sent by our trainer-side code (SGLangClient + topd_ds.comm.weight_group):
    `distributed` joins a gloo group with the server (trainer rank 0) and broadcasts every tensor while
    /update_weights_from_distributed announces them (two updates over one group: fp32, then bf16 tensors);
    `tensor` sends /update_weights_from_tensor with a shared-memory handle. Each time the next answer carries
    the new version and logprobs of exactly the sent weights; the model is restored from disk afterwards."""
    from topd_ds.engines.sglang import SGLangClient
    from topd_ds.comm.weight_group import destroy_group, free_port, init_group, serialize_named_tensors

    p = random_prompts(model_dir, 1, lo=8, hi=8, seed=9)[0]
    body = {"input_ids": p, "return_logprob": True, "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 1}}
    rounds = [(11, torch.float32, "mem-1"), (12, torch.bfloat16, "mem-2")] if route == "distributed" \
        else [(13, torch.float32, "mem-3")]
    state = {}

    async def send(named, version):
        async with SGLangClient([url], max_retries=0, timeout_s=300) as client:
            if route == "tensor":
                return await client.update_weights_from_tensor(serialize_named_tensors(named), version)
            if "pg" not in state:
                port = free_port()

                def join(world):
                    state["pg"] = init_group(backend="gloo", master_address="127.0.0.1", master_port=port,
                                             world_size=world, rank=0, timeout_s=300)
                await client.init_weights_group(master_address="127.0.0.1", master_port=port, backend="gloo",
                                                join=join)

            def broadcast():
                for _, t in named:
                    torch.distributed.broadcast(t, src=0, group=state["pg"])
            await client.update_weights_from_distributed(
                [n for n, _ in named], [str(t.dtype).removeprefix("torch.") for _, t in named],
                [list(t.shape) for _, t in named], version, broadcast)
    try:
        for seed, dtype, version in rounds:
            _, new_model = perturbed_copy(model_dir, os.path.join(tmp_dir, f"mem-{seed}"), seed=seed)
            with torch.no_grad():
                for prm in new_model.parameters():
                    prm.copy_(prm.to(dtype))           # the reference holds exactly the values sent
            named = [(n, prm.detach().to(dtype).clone()) for n, prm in new_model.named_parameters()]
            asyncio.run(send(named, version))
            assert server_weight_version(url) == version
            item = generate(url, body)
            assert item["meta_info"]["weight_version"] == version
            ref_new, ref_old = ref_logprobs(new_model, p), ref_logprobs(reference(model_dir), p)
            got = [e[0] for e in item["meta_info"]["input_token_logprobs"][1:]]
            assert max(abs(g - ref_new[t, p[t + 1]].item()) for t, g in enumerate(got)) < LOGPROB_TOL, (route, version)
            assert max(abs(g - ref_old[t, p[t + 1]].item()) for t, g in enumerate(got)) > 1e-3
    finally:
        if "pg" in state:
            destroy_group(state["pg"])
            call(url, "/destroy_weights_update_group", {"group_name": "weight_update_group"})
        status, ans = call(url, "/update_weights_from_disk", {"model_path": model_dir, "weight_version": "restored"})
        assert status == 200 and ans["success"] is True, ans


def check_bad_requests(url, model_dir):
    """Malformed requests get a 4xx and the server keeps serving. (Token ids past the vocabulary are
    not in this list: SGLang 0.5.23 answers them with 200; the built-in server says 400.)"""
    bad = [
        {"sampling_params": {"max_new_tokens": 2}},                                    # no input
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -3}},               # negative length
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "top_p": 1.5}},  # top_p out of range
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "temperature": -1.0}},
    ]
    for body in bad:
        status, ans = call(url, "/generate", body)
        assert 400 <= status < 500, f"{body} -> {status} {ans}"
    status, _ = call(url, "/generate", raw=b"{not json")
    assert 400 <= status < 500, status
    status, ans = call(url, "/update_weights_from_disk", {"model_path": "/nonexistent/model", "weight_version": "x"})
    assert 400 <= status < 500 and ans["success"] is False, (status, ans)
    assert server_weight_version(url) != "x"
    assert call(url, "/health")[0] == 200
    generate(url, {"input_ids": [1, 4], "sampling_params": {"max_new_tokens": 2}})


def check_client_roundtrip(url, model_dir):
    """The trainer's SGLangClient end to end: shapes, score == forward, hidden (L, H), continue_from."""
    from topd_ds.engines.protocol import SamplingParams
    from topd_ds.engines.sglang import SGLangClient

    model = reference(model_dir)
    prompts = random_prompts(model_dir, 3, lo=3, hi=8, seed=10)

    async def run():
        async with SGLangClient(url, hidden_size=model.config.hidden_size, prompts_per_request=2) as client:
            assert await client.health()
            groups = await client.generate(prompts, SamplingParams(max_new_tokens=5, ignore_eos=True), n=2)
            seqs = [p + g[0].output_ids for p, g in zip(prompts, groups)]
            starts = [len(p) for p in prompts]
            scores = await client.score(seqs, start=starts, top_k=3, return_hidden=True)
            windows = await client.continue_from(prompts, 4, SamplingParams(max_new_tokens=99, temperature=0.0))
            return groups, seqs, starts, scores, windows

    groups, seqs, starts, scores, windows = asyncio.run(run())
    assert [len(g) for g in groups] == [2, 2, 2]
    for g, seq, s, sc in zip(groups, seqs, starts, scores):
        assert all(len(c.output_ids) == 5 == len(c.logprobs) and c.finish_reason == "length" for c in g)
        ref = ref_logprobs(model, seq)
        want = [ref[t - 1, seq[t]].item() for t in range(s, len(seq))]
        assert len(sc.token_logprobs) == len(want)
        assert max(abs(a - b) for a, b in zip(sc.token_logprobs, want)) < LOGPROB_TOL
        assert max(abs(a - b) for a, b in zip(sc.token_logprobs, g[0].logprobs)) < LOGPROB_TOL
        assert len(sc.topk_ids) == len(want) and all(len(r) == 3 for r in sc.topk_ids)
        assert sc.topk_ids[0][0] == int(ref[s - 1].argmax())
        assert sc.hidden_states.shape == (len(seq), model.config.hidden_size)
        assert abs(sc.hidden_states - ref_hidden(model, seq).numpy()).max() < HIDDEN_TOL
    for w, p in zip(windows, prompts):
        assert 1 <= len(w.output_ids) <= 4 and (len(w.output_ids) == 4 or w.finish_reason == "stop")


# ---- long sequences under chunked prefill (make test-sglang starts SGLang with --chunked-prefill-size 16) -------
def long_sequences(model_dir, count, *, seed):
    """`count` sequences of 40-100 tokens: longer than the harness's 16-token prefill chunk, and the first two
    share a 30-token prefix (a radix-cache hit once one of them was computed)."""
    seqs = random_prompts(model_dir, count, lo=40, hi=100, seed=seed)
    seqs[1][:30] = seqs[0][:30]
    return seqs


def _client_scores(url, model_dir, seqs, starts, *, per_request, hidden, top_k=4, rollouts=0, flush=True):
    """The trainer's SGLangClient.score on `seqs` (per_request sequences packed into one request), after a
    cache flush (cold) and once more (warm); with `rollouts`, that many sampled rollouts run at the same time."""
    from topd_ds.engines.protocol import SamplingParams
    from topd_ds.engines.sglang import SGLangClient

    H = reference(model_dir).config.hidden_size

    async def run():
        async with SGLangClient(url, hidden_size=H, prompts_per_request=per_request) as client:
            if flush:
                await client.flush_cache()
            out = []
            for _ in range(2):                                                     # cold, then warm
                tasks = [client.score(seqs, start=starts, top_k=top_k, return_hidden=hidden)]
                if rollouts:
                    tasks.append(client.generate(random_prompts(model_dir, rollouts, lo=20, hi=60, seed=99),
                                                 SamplingParams(max_new_tokens=12, ignore_eos=True), n=2))
                out.append((await asyncio.gather(*tasks))[0])
            return out
    return asyncio.run(run())


def _assert_scores_match_forward(model_dir, seqs, starts, scores, *, hidden, top_k=4):
    """Per sequence: token logprobs and top-k == the float32 forward, and (hidden) all (L, H) rows equal."""
    model = reference(model_dir)
    for i, (seq, s, sc) in enumerate(zip(seqs, starts, scores)):
        ref = ref_logprobs(model, seq)
        want = [ref[t - 1, seq[t]].item() for t in range(s, len(seq))]
        assert len(sc.token_logprobs) == len(want), (i, len(sc.token_logprobs), len(want))
        err = max(abs(a - b) for a, b in zip(sc.token_logprobs, want))
        assert err < LOGPROB_TOL, f"sequence {i} (length {len(seq)}): max logprob error {err}"
        top = ref[s - 1:len(seq) - 1].topk(top_k, -1)
        assert np.asarray(sc.topk_ids).tolist() == top.indices.tolist(), f"sequence {i}: top-k ids differ"
        assert (torch.tensor(sc.topk_logprobs, dtype=torch.float64) - top.values).abs().max() < LOGPROB_TOL
        if hidden:
            want_h = ref_hidden(model, seq).numpy()
            assert sc.hidden_states.shape == want_h.shape, f"sequence {i}: {sc.hidden_states.shape} != {want_h.shape}"
            err = abs(sc.hidden_states - want_h).max()
            assert err < HIDDEN_TOL, f"sequence {i} (length {len(seq)}): max hidden-state error {err}"


def _check_long(url, model_dir, *, per_request, hidden, rollouts=0, seed):
    seqs = long_sequences(model_dir, 4, seed=seed)
    starts = [len(q) // 3 for q in seqs]
    for scores in _client_scores(url, model_dir, seqs, starts, per_request=per_request, hidden=hidden,
                                 rollouts=rollouts):
        _assert_scores_match_forward(model_dir, seqs, starts, scores, hidden=hidden)


def check_long_logprobs_packed(url, model_dir):
    """Four 40-100-token sequences in one request, cache cold then warm: logprobs and top-k == forward."""
    _check_long(url, model_dir, per_request=4, hidden=False, seed=20)


def check_long_logprobs_mixed_with_rollouts(url, model_dir):
    _check_long(url, model_dir, per_request=2, hidden=False, rollouts=3, seed=21)


def check_long_hidden_single(url, model_dir):
    """One sequence per request, each longer than the prefill chunk: every one of its L hidden rows."""
    _check_long(url, model_dir, per_request=1, hidden=True, seed=22)


def check_long_hidden_packed(url, model_dir):
    """Four sequences per request (their prefill shares one chunk budget), cold then warm (radix hits)."""
    _check_long(url, model_dir, per_request=4, hidden=True, seed=23)


def check_long_hidden_mixed_with_rollouts(url, model_dir):
    """Scoring with hidden states while rollouts decode in the same server batches."""
    _check_long(url, model_dir, per_request=2, hidden=True, rollouts=3, seed=24)


CHUNKED_CHECKS = [check_long_logprobs_packed, check_long_logprobs_mixed_with_rollouts, check_long_hidden_single,
                  check_long_hidden_packed, check_long_hidden_mixed_with_rollouts]

CHECKS = [check_health_and_info, check_generate_schema, check_logprobs_match_forward, check_topk_consistent,
          check_flat_top_logprobs,
          check_hidden_states, check_n_samples, check_stop_and_eos, check_bad_requests, check_client_roundtrip]
