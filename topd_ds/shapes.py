"""A model's shapes read from its directory (config.json, safetensors headers; no weights loaded) and the
arithmetic built on them: positions against prompt + new tokens, and the memory per rank of docs/SCALING.md.
Pure functions shared by config.load_config (the length check) and `topd-ds check` (preflight.py)."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

GB = 1e9
ACT_BYTES_NO_CKPT = 42        # activations per token per layer per hidden unit without checkpointing: ~108 KB
                              # at H = 2560 (docs/SCALING.md section 1: norms, q/k/v, attention, MLP inputs, bf16)


# ---- model shapes -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs of a model, from its config.json and safetensors headers (no weights read)."""
    n_params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    positions: int | None


def model_config(model_dir: str) -> dict:
    """config.json of a save_pretrained folder (its text_config for multimodal ones); {} if none."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    return cfg.get("text_config") or cfg


def max_positions(model_dir: str) -> int | None:
    """The model's max_position_embeddings (what the built-in server enforces), None if unknown."""
    n = model_config(model_dir).get("max_position_embeddings")
    return n if isinstance(n, int) and n > 0 else None


def param_count(model_dir: str) -> int | None:
    """Parameters in the folder's *.safetensors files, from their headers only (8-byte length + JSON)."""
    total, found = 0, False
    for name in sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []:
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(model_dir, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, meta in header.items():
            if key != "__metadata__":
                total += math.prod(meta["shape"])
                found = True
    return total if found else None


def model_shape(model_dir: str) -> ModelShape:
    c = model_config(model_dir)
    hidden = int(c.get("hidden_size", 0))
    inter = int(c.get("intermediate_size") or c.get("moe_intermediate_size") or 4 * hidden)
    return ModelShape(n_params=param_count(model_dir) or 0, hidden=hidden, layers=int(c.get("num_hidden_layers", 0)),
                      intermediate=inter, vocab=int(c.get("vocab_size", 0)), positions=max_positions(model_dir))


# ---- memory per rank (docs/SCALING.md section 1) ------------------------------------------------------------
def memory_per_rank(student: ModelShape, *, ranks: int, tokens: int, chunk_size: int, dense_mask_tokens: int = 0,
                    mask_rows: int = 1,
                    teacher_hidden_tokens: int = 0, teacher_hidden_size: int = 0, teacher_params: int = 0,
                    live_params: float = 1e9, checkpointing: bool = True) -> dict:
    """Bytes one training rank holds at its peak micro-step, term by term (docs/SCALING.md section 1):

        model states       16 B x params / ranks      (ZeRO-3: bf16 weights + grads, fp32 master + Adam m, v)
        activations        tokens x H x 2 B x layers  (checkpointed: each layer's input; else ~42 H B per layer)
        one layer          tokens x (3 I + 6 H) x 2 B (recomputed in backward: MLP 3 x I wide, attention)
        attention mask     rows x T^2 x (1 + 2) B     (sdpa's dense bool mask + its bf16 bias; 0 without one)
        loss chunk         8 x min(chunk, tokens) x V x 4 B (fp32 (chunk, V) tensors of the chunked losses)
        lm_head            V x H x (2 + 4) B          (gathered by ZeRO-3 in the loss + its fp32 gradient)
        live parameters    min(live, params) x 2 B    (stage3_max_live_parameters)
        teacher hidden     tokens_t x H_t x 4 B       (teacher.scoring server: the teacher's states, fp32)
        teacher shard      2 B x teacher params / ranks (teacher.scoring local: its ZeRO-3 bf16 shard)

    `tokens` is what this rank forwards (stage 2 TOPD: L + M (K - 1); under sequence parallelism its 1/sp of
    the row). Returns {term: bytes} and "total"."""
    H, layers = student.hidden, student.layers
    act = tokens * H * 2 * layers if checkpointing else tokens * H * ACT_BYTES_NO_CKPT * layers
    terms = {
        "model states": 16 * student.n_params / ranks,
        "activations": act,
        "one layer": tokens * (3 * student.intermediate + 6 * H) * 2,
        "attention mask": mask_rows * dense_mask_tokens ** 2 * 3,
        "loss chunk": 8 * min(chunk_size, tokens) * student.vocab * 4,
        "lm_head": student.vocab * H * 6,
        "live parameters": min(live_params, student.n_params) * 2,
        "teacher hidden": teacher_hidden_tokens * teacher_hidden_size * 4,
        "teacher shard": 2 * teacher_params / ranks,
    }
    terms["total"] = sum(terms.values())
    return terms


def run_shapes(cfg, prompt_tokens: int) -> dict:
    """The worst-case shapes of one micro-step of this config: tokens per rank, dense-mask row, teacher rows."""
    t = cfg.train
    if t.stage == "opd":
        L = prompt_tokens + cfg.rollout.max_new_tokens
        tokens = L
        if cfg.topd.mode == "topd":   # real divergent points' windows packed behind the rollout (packing.py)
            frac = cfg.topd.candidate_fraction if not cfg.topd.candidate_count else cfg.topd.candidate_count / L
            M = math.ceil(frac * L * (1 - cfg.topd.false_alarm_quantile))
            tokens = L + M * (cfg.topd.window - 1)
        return {"tokens": tokens * t.micro_batch_size, "dense_mask": tokens if cfg.topd.mode == "topd" else 0,
                "mask_rows": t.micro_batch_size,
                "teacher_tokens": L * t.micro_batch_size}
    sample = prompt_tokens + cfg.kd.max_new_tokens
    sp = t.sequence_parallel_size
    row = (t.micro_batch_size * sample if sp > 1 else (cfg.kd.pack_to or sample * t.micro_batch_size))
    # packed rows without SP: transformers' dense mask; under SP the per-sample core needs none (finding 9)
    dense = row if (sp == 1 and cfg.kd.pack_to) else 0
    return {"tokens": math.ceil(row / sp), "dense_mask": dense, "mask_rows": 1, "teacher_tokens": math.ceil(row / sp)}


# ---- lengths ------------------------------------------------------------------------------------------------
def length_uses(cfg) -> list:
    """(role, key, new tokens) of every generation this config asks a server for."""
    uses = []
    if cfg.train.stage == "opd":
        uses += [("student", "rollout.max_new_tokens", cfg.rollout.max_new_tokens),
                 ("teacher", "rollout.max_new_tokens", cfg.rollout.max_new_tokens)]   # scores the whole rollout
    elif cfg.data.eval:
        uses.append(("student", "rollout.max_new_tokens", cfg.rollout.max_new_tokens))  # the eval's length
    if cfg.train.stage == "kd" and cfg.kd.source == "teacher":
        uses.append(("teacher", "kd.max_new_tokens", cfg.kd.max_new_tokens))            # topd-ds sample
    return uses


def length_problems(uses: list, prompt_tokens: int, limits: dict) -> list:
    """One line per (role, key, new) whose prompt + new tokens exceed the role's limit.
    limits: role -> (positions, where they come from); a role missing or None is not checked."""
    out = []
    for role, key, new in uses:
        limit, where = limits.get(role) or (None, "")
        if limit and prompt_tokens + new > limit:
            out.append(f"{key}: {prompt_tokens} prompt token(s) + {new} new = {prompt_tokens + new} > the {role}'s "
                       f"{limit} positions ({where}); set {key} to at most {max(limit - prompt_tokens, 0)}")
    return out


def config_length_problems(cfg) -> list:
    """load_config's cheap form: the shortest prompt (1 token) + new tokens against model.student's and
    model.teacher's max_position_embeddings (config.json). Catches 8000 new tokens on a 128-position model
    before any server starts; `topd-ds check` repeats it with the data's real prompts and the servers' limits."""
    limits = {}
    for role, d in (("student", cfg.model.student), ("teacher", cfg.model.teacher)):
        n = max_positions(d)
        limits[role] = (n, f"max_position_embeddings in {os.path.join(d, 'config.json')}")
    seen, out = set(), []
    for line in length_problems(length_uses(cfg), 1, limits):
        key = line.split(":", 1)[0]
        if key not in seen:   # one line per key
            seen.add(key)
            out.append(line)
    return out
