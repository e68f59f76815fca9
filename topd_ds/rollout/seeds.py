"""Per-sample sampling seeds that never repeat within a run.

Every sampled sequence of a run (a rollout sample, a probing continuation, ...) gets its own seed:

    sample_seed(run_seed, stream, step, index, sample)
        = mix63((pack(stream, step, index, sample) + mix63(run_seed mod 2**63)) mod 2**63)

`pack` puts the four fields into disjoint bit ranges of a 63-bit integer (so it is injective) and `mix63`
is a bijection of [0, 2**63) (xor-shifts and multiplications by odd constants, as in splitmix64, on 63
bits). For one run seed the whole map is therefore injective: two samples of a run share a seed only if
they have the same (stream, step, index, sample), i.e. they are the same sample. Different run seeds give
unrelated streams (run seed s + 1 is not run seed s shifted by one sample, as `seed * C + step + row` was).
Seeds fit SGLang's `sampling_seed` (an int64, [-2**63, 2**63 - 1]) and torch.Generator.manual_seed.

    >>> sample_seed(0, ROLLOUT, 3, 1, 0) != sample_seed(0, ROLLOUT, 2, 2, 0)
    True
"""

from __future__ import annotations

MASK63 = (1 << 63) - 1

# streams: which kind of sample; each has its own seed space
ROLLOUT = 0
PROBE_TEACHER = 1
PROBE_STUDENT = 2
PROBE_TEACHER_LOW = 3
PROBE_STUDENT_LOW = 4
KD_SAMPLE = 5          # stage 1's teacher responses (topd-ds sample): step 0, index = record index
STREAM_BITS, STEP_BITS, INDEX_BITS, SAMPLE_BITS = 3, 28, 24, 8   # 63 bits in all


def mix63(x: int) -> int:
    """A bijection of [0, 2**63): each step (x ^= x >> s, x *= odd mod 2**63) is invertible."""
    x &= MASK63
    x = ((x ^ (x >> 31)) * 0x3F58476D1CE4E5B9) & MASK63
    x = ((x ^ (x >> 27)) * 0x14D049BB133111EB) & MASK63
    return x ^ (x >> 32)


def pack(stream: int, step: int, index: int, sample: int) -> int:
    """The four fields in disjoint bit ranges (ValueError naming the field when one is out of range)."""
    out = 0
    for name, value, bits in (("stream", stream, STREAM_BITS), ("step", step, STEP_BITS),
                              ("index", index, INDEX_BITS), ("sample", sample, SAMPLE_BITS)):
        if not 0 <= value < (1 << bits):
            raise ValueError(f"sample_seed: {name} {value} outside [0, 2**{bits})")
        out = (out << bits) | value
    return out


def sample_seed(run_seed: int, stream: int, step: int, index: int, sample: int = 0) -> int:
    """The seed of sample `sample` of item `index` (a prompt, a probed prefix) of `step` in `stream`."""
    return mix63((pack(stream, step, index, sample) + mix63(run_seed & MASK63)) & MASK63)


def seed_grid(run_seed: int, stream: int, step: int, count: int, n: int = 1) -> list[list[int]]:
    """Seeds of n samples for each of `count` items: grid[i][j] = sample_seed(.., step, i, j)."""
    return [[sample_seed(run_seed, stream, step, i, j) for j in range(n)] for i in range(count)]
