"""The model side of the built-in server: batched prefill + KV-cached decode of a transformers model.

`HFEngine.generate(rows)` runs a list of independent requests ("rows": one prompt, one sample) as
one left-padded batch (chunks of at most `max_batch` rows; rows that are prefixes of another row of the chunk,
as the probes of one rollout are, share that row's prefill: `shared_prefixes`) and returns, per row, the JSON object
SGLang's /generate returns for one input (same field names, same conventions; see docs/ENGINES.md):

    output_ids                      sampled ids; a stop token / EOS that ended the row is kept last
    meta_info.finish_reason         {"type": "stop", "matched": id} | {"type": "length", "length": n}
    meta_info.input_token_logprobs  for positions s..L-1 (s = logprob_start_len): [[None, ids[s], None],
                                    [lp(ids[s+1] | ids[:s+1]), ids[s+1], None], ...]  (first one None,
                                    as SGLang's scheduler does for every s)
    meta_info.output_token_logprobs [[lp, id, None], ...] under the temperature-scaled distribution
                                    before top-k/top-p truncation (SGLang's default); greedy
                                    (temperature 0) reports temperature-1 logprobs, as SGLang does
    meta_info.*_top_logprobs        per position k triples [lp, id, None] of that same distribution
    meta_info.input_top_logprobs_*  with return_flat_raw_top_logprobs (SGLang 0.5.23's flat form, replacing the
                                    nested input_top_logprobs): val / idx as flat lists, or as base64 of
                                    little-endian float32 / int32 with return_flat_raw_top_logprobs_b64, plus
                                    shape [rows, k] and null_prefix (the leading positions without a row: 1)
    meta_info.hidden_states         [prefill (L, H), then one (H,) per decode step]: the final hidden
                                    state (after the last norm) of each token fed to the model; as
                                    tensor_codec objects (the model's dtype) when the row asks base64

All of it runs on one worker thread; nothing here touches asyncio.
"""

from __future__ import annotations

import base64
import os
import uuid
from dataclasses import dataclass

import torch

from topd_ds.engines.tensor_codec import encode_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    """One prompt, one sample, with everything needed to run and answer it."""

    input_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                # -1: whole vocabulary
    stop_token_ids: frozenset = frozenset()
    ignore_eos: bool = False
    seed: int | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1    # -1: no input logprobs
    top_logprobs_num: int = 0
    return_hidden_states: bool = False
    hidden_states_encoding: str = "json"   # "json": lists of floats (SGLang's); "base64": tensor_codec
    flat_top_logprobs: bool = False        # return_flat_raw_top_logprobs: input top-k as flat arrays
    flat_top_logprobs_b64: bool = False    # return_flat_raw_top_logprobs_b64: those arrays as base64


def sample_next(logits, temperature, top_k, top_p, uniforms):
    """Sample one token per row; returns (token ids (B,), logprobs of the scaled distribution (B, V)).

    p = softmax(logits / T) (T = 1 for greedy rows, which get top_k = 1); keep the top_k largest and
    the smallest prefix whose mass before it is < top_p; renormalise; invert the CDF at `uniforms`.
    logits (B, V) float32; temperature, top_p, uniforms (B,) float; top_k (B,) int with -1 = V.
    """
    B, V = logits.shape
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature)
    logprobs = torch.log_softmax(logits / temp[:, None], dim=-1)              # (B, V)
    k = torch.where(greedy, torch.ones_like(top_k), torch.where(top_k < 0, torch.full_like(top_k, V), top_k))
    probs_sorted, idx_sorted = logprobs.exp().sort(dim=-1, descending=True)    # (B, V)
    rank = torch.arange(V, device=logits.device)[None, :]
    mass_before = probs_sorted.cumsum(-1) - probs_sorted
    keep = (rank < k[:, None]) & ((mass_before < top_p[:, None]) | (rank == 0))
    kept = probs_sorted * keep
    cdf = kept.cumsum(-1)                                                      # (B, V)
    target = uniforms[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target).clamp(max=V - 1)                    # (B, 1)
    # a zero-probability pick can only come from float ties at the edge: step back to a kept one
    pick = torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)
    return idx_sorted.gather(-1, pick).squeeze(-1), logprobs


def _triples(logprobs_row, ids):
    return [[float(lp), int(t), None] for lp, t in zip(logprobs_row, ids)]


def _topk_triples(logprobs, k):
    """logprobs (N, V) -> N lists of k [lp, id, None] triples, most likely first."""
    vals, ids = logprobs.topk(k, dim=-1)
    return [[[float(v), int(i), None] for v, i in zip(vr, ir)] for vr, ir in zip(vals.tolist(), ids.tolist())]


def flat_top_fields(logprobs, k: int, *, b64: bool, null_prefix: int = 1) -> dict:
    """logprobs (N, V) -> SGLang 0.5.23's flat input top-k fields (tokenizer_manager.py
    _build_flat_top_logprobs_fields_from_arrays): float32 values and int32 ids of shape (N, k), most likely
    first, as flat lists or base64 of their little-endian bytes; `null_prefix` positions before the rows."""
    vals, ids = logprobs.topk(k, dim=-1)
    vals, ids = vals.float().cpu().numpy(), ids.int().cpu().numpy()              # (N, k) float32, int32
    out = {"input_top_logprobs_shape": [int(vals.shape[0]), k], "input_top_logprobs_null_prefix": null_prefix}
    if b64:
        out.update({"input_top_logprobs_val_flat_b64": base64.b64encode(vals.astype("<f4").tobytes()).decode("ascii"),
                    "input_top_logprobs_idx_flat_b64": base64.b64encode(ids.astype("<i4").tobytes()).decode("ascii"),
                    "input_top_logprobs_val_flat_b64_dtype": "float32",
                    "input_top_logprobs_idx_flat_b64_dtype": "int32"})
    else:
        out.update({"input_top_logprobs_val_flat": vals.reshape(-1).tolist(),
                    "input_top_logprobs_idx_flat": ids.reshape(-1).tolist()})
    return out


def last_chunk_start(length: int, chunk: int) -> int:
    """First position whose prefill hidden state SGLang returns for an input of `length` tokens prefilled in
    chunks of `chunk` (--chunked-prefill-size; <= 0: off, every row). SGLang 0.5.23 returns the hidden states
    of the tokens computed in the request's last forward only, i.e. its last prefill chunk; this emulates it
    without a radix cache (chunks counted from position 0, as with --disable-radix-cache), so the client's
    re-ask for the missing head rows (engines/sglang.py SGLangClient._hidden_head) runs against the built-in
    server too.

    >>> last_chunk_start(40, 16), last_chunk_start(32, 16), last_chunk_start(5, 16), last_chunk_start(40, -1)
    (32, 16, 0, 0)
    """
    return chunk * ((length - 1) // chunk) if chunk > 0 else 0


def shared_prefixes(prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """Which prompts one prefill can serve: (roots, root_of). root_of[i] is a prompt that has prompt i as a prefix
    and is itself no other prompt's proper prefix (the probes of one rollout, seq[:t1], seq[:t2], ... all map to
    the longest); roots are those prompts, in first-seen order. Every prompt is its own root when none shares.

    In lexicographic order a prompt's extensions follow it, so walking that order backwards, prompt p takes
    the root of the next prompt when the next one extends p: O(n log n) comparisons plus one prefix check each.
    Equal prompts share one root (the last of them in sorted order)."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    root_of = list(range(len(prompts)))
    for a, b in zip(reversed(order[:-1]), reversed(order[1:])):
        pa, pb = prompts[a], prompts[b]
        if len(pb) >= len(pa) and pb[:len(pa)] == pa:
            root_of[a] = root_of[b]
    roots = list(dict.fromkeys(root_of))
    return roots, root_of


def expand_shared(hidden_r, cache, root_lens, row_root, lens):
    """The per-row left-padded batch from the roots' prefill: row b is the first lens[b] tokens of root
    row_root[b] (an index into the roots). hidden_r (R, Lr, H) and every cache layer's (R, heads, Lr, d)
    keys/values are gathered into (B, L, H) and (B, heads, L, d), L = max(lens), row b's tokens at the right
    end as a prefill of the rows themselves would place them; returns (hidden, mask (B, L), positions (B, L)).
    Causal attention makes a token's keys/values and hidden state depend only on the tokens before it, so the
    slice equals the row's own prefill (up to float rounding of differently shaped kernels)."""
    dev = hidden_r.device
    R, Lr, H = hidden_r.shape
    L = max(lens)
    lens_t = torch.tensor(lens, device=dev)[:, None]                                       # (B, 1)
    col = torch.arange(L, device=dev)[None, :]                                             # (1, L)
    mask = (col >= L - lens_t).long()                                                      # (B, L)
    j = col - (L - lens_t)                                                                 # token index in row
    start = Lr - torch.tensor(root_lens, device=dev)[torch.tensor(row_root, device=dev)]  # root's left pad
    src = (start[:, None] + j).clamp(0, Lr - 1)               # padding columns read a real (masked) entry
    flat = torch.tensor(row_root, device=dev)[:, None] * Lr + src                          # (B, L)
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)                                                       # (R, h, Lr, d)
            h, d = t.shape[1], t.shape[3]
            rows = t.transpose(1, 2).reshape(R * Lr, h, d)[flat]                           # (B, L, h, d)
            setattr(layer, name, rows.transpose(1, 2).contiguous())
    hidden = hidden_r.reshape(R * Lr, H)[flat]                                             # (B, L, H)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return hidden, mask, pos


class HFEngine:
    """A causal LM from a HF directory, served row-batched with a DynamicCache."""

    def __init__(self, model_dir: str, *, device: str = "cpu", dtype: str = "float32", max_batch: int = 64):
        from transformers import AutoModelForCausalLM

        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model_dir, self.device, self.dtype, self.max_batch = model_dir, torch.device(device), DTYPES[dtype], max_batch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.hidden_size = int(cfg.hidden_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        eos = getattr(self.model.generation_config, "eos_token_id", None) or cfg.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.weight_version = "default"   # SGLang's initial weight_version
        self.tokenizer = None
        try:  # only to fill the informational "text" field
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception:  # a model dir without a tokenizer still serves token ids
            self.tokenizer = None
        self.rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        self.groups = {}                  # group_name -> weight-update process group (update_weights_from_distributed)
        self.chunked_prefill_size = -1    # > 0: prefill hidden states of the last chunk only (last_chunk_start)

    def load_weights(self, model_path: str, weight_version: str | None) -> None:
        """Replace the weights in place from a HF directory of the same architecture."""
        from transformers import AutoModelForCausalLM

        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"model_path: no such directory {model_path!r}")
        new = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        self.model.load_state_dict(new.state_dict(), strict=True)
        self.model_dir = model_path
        if weight_version is not None:
            self.weight_version = weight_version

    # ---- in-memory weight routes (same request bodies as SGLang 0.5.23; topd_ds/comm/weight_group.py) ----------
    def init_weights_group(self, *, master_address: str, master_port: int, rank_offset: int, world_size: int,
                           group_name: str, backend: str) -> None:
        """Join the trainer's weight-update group as rank `rank_offset` (one rank: no tensor parallelism)."""
        from topd_ds.comm.weight_group import init_group

        if group_name in self.groups:
            raise ValueError(f"group_name: {group_name!r} exists already (destroy it first)")
        self.groups[group_name] = init_group(backend=backend, master_address=master_address,
                                             master_port=master_port, world_size=world_size, rank=rank_offset,
                                             group_name=group_name)

    def destroy_weights_group(self, group_name: str) -> None:
        from topd_ds.comm.weight_group import destroy_group

        if group_name not in self.groups:
            raise ValueError(f"group_name: no group {group_name!r}")
        destroy_group(self.groups.pop(group_name))

    def receive_weights(self, names, dtypes, shapes, group_name: str) -> list:
        """Receive one broadcast from rank 0 per announced tensor, in order (as SGLang's
        receive_weights_from_distributed: all posted async, then waited for)."""
        if group_name not in self.groups:
            raise ValueError(f"group_name: no group {group_name!r}; call /init_weights_update_group first")
        group = self.groups[group_name]
        device = self.device if self.device.type != "cpu" else torch.device("cpu")
        out, handles = [], []
        for name, dtype, shape in zip(names, dtypes, shapes):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            handles.append(torch.distributed.broadcast(t, src=0, group=group, async_op=True))
            out.append((name, t))
        for h in handles:
            h.wait()
        return out

    @torch.no_grad()
    def load_named(self, named, weight_version: str | None) -> None:
        """Copy (name, tensor) pairs into the model's parameters by their HF names; every name and shape is
        checked before the first copy, so a bad request changes nothing."""
        state = self.model.state_dict()
        for name, t in named:
            if name not in state:
                raise ValueError(f"names: {name!r} is not a parameter of this model")
            if tuple(t.shape) != tuple(state[name].shape):
                raise ValueError(f"shapes: {name!r} has shape {tuple(state[name].shape)}, got {tuple(t.shape)}")
        for name, t in named:
            state[name].copy_(t)    # casts to the served dtype; tied weights share storage
        if weight_version is not None:
            self.weight_version = weight_version

    @torch.no_grad()
    def generate(self, rows: list[Row]) -> list[dict]:
        """Answer every row (in chunks of max_batch rows); one SGLang-shaped dict per row."""
        out = []
        for i in range(0, len(rows), self.max_batch):
            out += self._run_batch(rows[i:i + self.max_batch])
        return out

    def _forward(self, ids, mask, pos, cache):
        hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                          cache=cache, use_cache=True).last_hidden_state
        return hidden                                                          # (B, T, H)

    def _logits(self, hidden):
        return self.model.get_output_embeddings()(hidden).float()              # (..., V) float32

    def _prefill(self, prompts: list[list[int]], cache):
        """Left-padded prefill of `prompts` into `cache` -> (hidden (B, L, H), mask (B, L), positions (B, L))."""
        dev, B = self.device, len(prompts)
        lens = [len(p) for p in prompts]
        L = max(lens)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):                                        # left padding
            ids[b, L - lens[b]:] = torch.tensor(p)
            mask[b, L - lens[b]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)                               # (B, L)
        return self._forward(ids, mask, pos, cache), mask, pos

    def _shareable(self, cache) -> bool:
        """Prefix sharing slices and regathers every layer's keys/values: only for plain full-attention layers."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def _run_batch(self, rows: list[Row]) -> list[dict]:
        from transformers import DynamicCache

        dev, B = self.device, len(rows)
        lens = [len(r.input_ids) for r in rows]
        cache = DynamicCache(config=self.model.config)
        roots, root_of = shared_prefixes([r.input_ids for r in rows])
        if len(roots) == B or not self._shareable(cache):
            hidden, mask, pos = self._prefill([r.input_ids for r in rows], cache)   # (B, L, H)
        else:  # one prefill per root, then each row's slice of its root's keys/values and hidden states
            hidden_r, _, _ = self._prefill([rows[g].input_ids for g in roots], cache)
            slot = {g: i for i, g in enumerate(roots)}
            hidden, mask, pos = expand_shared(hidden_r, cache, [lens[g] for g in roots],
                                              [slot[root_of[b]] for b in range(B)], lens)
        L = max(lens)

        metas = [{"input_token_logprobs": [], "output_token_logprobs": [], "input_top_logprobs": [],
                  "output_top_logprobs": [], "hidden_states": []} for _ in rows]
        for b, r in enumerate(rows):
            off = L - lens[b]
            if r.return_hidden_states:
                first = last_chunk_start(lens[b], self.chunked_prefill_size)
                metas[b]["hidden_states"].append(hidden[b, off + first:].cpu())           # (L_b - first, H)
            if r.return_logprob and r.logprob_start_len >= 0:
                s = r.logprob_start_len
                lp = torch.log_softmax(self._logits(hidden[b, off + s:L - 1]), -1)       # (L_b-1-s, V)
                tgt = r.input_ids[s + 1:]
                vals = lp.gather(-1, torch.tensor(tgt, device=dev)[:, None]).squeeze(-1).tolist()
                metas[b]["input_token_logprobs"] = [[None, r.input_ids[s], None]] + _triples(vals, tgt)
                if r.top_logprobs_num > 0 and r.flat_top_logprobs:
                    metas[b]["input_top_flat"] = flat_top_fields(lp, r.top_logprobs_num, b64=r.flat_top_logprobs_b64)
                elif r.top_logprobs_num > 0:
                    metas[b]["input_top_logprobs"] = [None] + _topk_triples(lp, r.top_logprobs_num)

        temperature = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=dev)
        top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=dev)
        top_k = torch.tensor([r.top_k for r in rows], dtype=torch.long, device=dev)
        gens = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in rows]
        outputs = [[] for _ in rows]
        finish = [None if r.max_new_tokens > 0 else {"type": "length", "length": 0} for r in rows]
        last_hidden = hidden[:, -1]                                            # (B, H)
        cur_pos = pos[:, -1]                                                   # (B,)
        while True:
            logits = self._logits(last_hidden)                                 # (B, V)
            u = torch.rand(B, generator=self.rng)                              # (B,) one draw per row
            for b, g in enumerate(gens):
                if g is not None:                                              # seeded rows: their own stream
                    u[b] = torch.rand((), generator=g)
            tok, logprobs = sample_next(logits, temperature, top_k, top_p, u.to(dev))
            tok_list = tok.tolist()
            chosen = logprobs.gather(-1, tok[:, None]).squeeze(-1).tolist()    # (B,) logprob of each pick
            for b, r in enumerate(rows):
                if finish[b] is not None:
                    continue
                t = tok_list[b]
                outputs[b].append(t)
                if r.return_logprob:
                    metas[b]["output_token_logprobs"].append([chosen[b], t, None])
                    if r.top_logprobs_num > 0:
                        metas[b]["output_top_logprobs"] += _topk_triples(logprobs[b:b + 1], r.top_logprobs_num)
                if not r.ignore_eos and (t in r.stop_token_ids or t in self.eos_ids):   # SGLang: ignore_eos skips both
                    finish[b] = {"type": "stop", "matched": t}
                elif len(outputs[b]) >= r.max_new_tokens:
                    finish[b] = {"type": "length", "length": r.max_new_tokens}
            if all(f is not None for f in finish):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
            cur_pos = cur_pos + 1
            hidden = self._forward(tok[:, None], mask, cur_pos[:, None], cache)  # (B, 1, H)
            last_hidden = hidden[:, -1]
            for b, r in enumerate(rows):
                if finish[b] is None and r.return_hidden_states:
                    metas[b]["hidden_states"].append(last_hidden[b].cpu())
        return [self._answer(r, outputs[b], finish[b], metas[b]) for b, r in enumerate(rows)]

    def _answer(self, r: Row, output_ids: list[int], finish: dict, meta: dict) -> dict:
        info = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(r.input_ids),
                "completion_tokens": len(output_ids), "cached_tokens": 0, "weight_version": self.weight_version}
        if r.return_logprob:
            info["input_token_logprobs"] = meta["input_token_logprobs"]
            info["output_token_logprobs"] = meta["output_token_logprobs"]
            if r.top_logprobs_num > 0:
                if "input_top_flat" in meta:      # the flat form replaces the nested input side only (as SGLang)
                    info.update(meta["input_top_flat"])
                else:
                    info["input_top_logprobs"] = meta["input_top_logprobs"]
                info["output_top_logprobs"] = meta["output_top_logprobs"]
        if r.return_hidden_states:  # the model's dtype on the wire with base64; JSON numbers otherwise
            encode = encode_tensor if r.hidden_states_encoding == "base64" else (lambda t: t.float().tolist())
            info["hidden_states"] = [encode(t) for t in meta["hidden_states"]]
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True) if self.tokenizer else ""
        return {"text": text, "output_ids": output_ids, "meta_info": info}


