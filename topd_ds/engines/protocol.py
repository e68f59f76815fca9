"""The one inference client API the trainer uses: typed results over token ids, never text.

Rollouts, teacher scoring and probing continuations all go through an `InferenceClient`
(SGLang in production, the built-in server elsewhere; both via `engines/sglang.py`). Text never
crosses this boundary: re-tokenising a rollout would silently shift the loss masks.

Shapes of the ragged results (names as in the trainer): prompts_P_T, completions_P_N, scores_S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one continuation (the subset of SGLang's sampling_params we use).

    temperature 0 means greedy; top_k -1 means no top-k cut; top_p 1.0 means no nucleus cut.
    stop_token_ids and EOS end a completion (the stop token is kept last in `output_ids`);
    ignore_eos disables both, as in SGLang (Req._check_token_based_finish returns early).
    seed makes the sample reproducible on servers that honour it (SGLang: sampling_seed, only when started
    with --enable-deterministic-inference); per-sample seeds are passed to `generate(seeds=...)`.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be an int >= 0, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature: must be finite and >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k: must be -1 (off) or >= 1, got {self.top_k!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def to_sglang(self) -> dict[str, Any]:
        """The `sampling_params` JSON object of SGLang's /generate."""
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                               "top_p": self.top_p, "top_k": self.top_k, "ignore_eos": self.ignore_eos}
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            out["sampling_seed"] = int(self.seed)
        return out


@dataclass
class Completion:
    """One sampled continuation: token ids, the logprob of each under the sampling distribution,
    and why it ended ("stop": a stop token or EOS, kept as the last id; "length"; "abort")."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str

    def __post_init__(self):
        assert len(self.output_ids) == len(self.logprobs), "Completion: ids and logprobs differ in length"
        assert self.finish_reason in FINISH_REASONS, f"Completion: bad finish_reason {self.finish_reason!r}"


@dataclass
class Scores:
    """Teacher/student scores of one given sequence, for positions start..len-1.

    token_logprobs[j] = log p(seq[start + j] | seq[:start + j])                      # (len - start,)
    topk_ids[j], topk_logprobs[j]: the top_k most likely next tokens at that same step # (len - start, k)
    hidden_states: final hidden states (after the last norm) of every position of the sequence,
    (len, H): float32 numpy from JSON numbers, or a torch tensor of the server's dtype when it answered
    the binary encoding (engines/tensor_codec.py); hidden_states[t] @ lm_head.T predicts seq[t + 1].
    """

    token_logprobs: list[float]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    hidden_states: Any = None


@runtime_checkable
class InferenceClient(Protocol):
    """What the trainer needs from an inference engine (all async, all over token ids)."""

    async def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                       n: int = 1, seeds: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """n samples per prompt: result[p][j] is sample j of prompt p, seeded by seeds[p][j] if given."""

    async def score(self, sequences: Sequence[Sequence[int]], *, start: Sequence[int] | int,
                    top_k: int = 0, return_hidden: bool = False) -> list[Scores]:
        """Logprob of every given token from `start` (per sequence or shared, >= 1) to the end."""

    async def continue_from(self, prefixes: Sequence[Sequence[int]], k: int,
                            params: SamplingParams, *, seeds: Sequence[int] | None = None) -> list[Completion]:
        """Probing: up to k new tokens from each prefix in one batched call (EOS may stop early);
        seeds[i] seeds prefix i's window."""

    async def update_weights(self, path: str, version: str) -> None:
        """Load new weights from a HF model directory on every server; tag them with `version`."""

    async def flush_cache(self) -> None:
        """Drop cached prefixes on every server (after a weight update)."""

    async def health(self) -> bool:
        """True when every server answers its health check."""

    async def weight_version(self) -> str:
        """The weight version the servers report (they must agree)."""

    async def close(self) -> None:
        """Release connections."""
