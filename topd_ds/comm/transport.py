"""Rank 0's per-sequence tensors to the rank that trains on each sequence: tensors, never pickles.

    tp = Transport()                                   # every rank, once, after init_distributed
    mine = tp.scatter(fields, owner, names=NAMES)      # every rank, once per step (rank 0 passes the data)

`fields` (rank 0 only) maps a name to one tensor per item (a sequence): ragged along dim 0, the same
trailing shape and dtype across items; `owner[i]` is the rank that trains on item i. Every rank gets
back {name: [its items' tensors, in item order]}; a rank receives the bytes of its own items only.

The wire, per call (the same sequence of collectives on every rank, whatever the data):
1. header: a small int64 tensor (status, tag, a few ints, per-name dtype and trailing shape, per-item
   owner and row counts), broadcast from rank 0 over a gloo "control" group. This is where the other
   ranks wait while rank 0's pipeline finishes the batch; the group has its own timeout
   (`wait_timeout_s`), and a timeout is reported as one line naming what was waited for.
2. data: one uint8 buffer per other rank (its items' fields back to back, 8-byte aligned), sent point
   to point over the default group (NCCL on GPUs, so the buffers live on the device). Both sides compute
   the layout from the header, so a rank whose share is empty skips its receive on both sides.
Rank 0's own items are sliced from its tensors without a copy. The bytes a rank receives are
sum over its items and fields of rows * row bytes: for the paper's stage 2 (4 rollouts of ~9.7k tokens,
teacher hidden 2048 in bf16) that is ~40 MB per rank with one sequence per rank, against the ~320 MB
pickled batch (float32) that `broadcast_object_list` sent to every rank (docs/results/speed.md, bench_transport).
"""

from __future__ import annotations

import datetime
import math
from typing import Sequence

import torch
import torch.distributed as dist

from topd_ds.errors import TopdError

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
MAX_TRAILING_DIMS = 3          # (rows, a, b, c) at most: plans are (n, K, K)
ALIGN = 8                      # byte alignment of each field in a buffer (float64 / int64 views)
WAIT_TIMEOUT_S = 3600.0        # how long a rank waits in the header for rank 0's batch
STATUS_DATA, STATUS_STOP = 1, 2


class TransportTimeout(TopdError, RuntimeError):
    """A rank waited longer than wait_timeout_s for rank 0's header."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _row_bytes(dtype: torch.dtype, trailing: Sequence[int]) -> int:
    return math.prod(trailing) * torch.empty((), dtype=dtype).element_size()


def layout(header: dict, rank: int) -> tuple[list[int], list[tuple[int, str, int, int]], int]:
    """(items of `rank`, [(item, name, byte offset, rows)], total bytes) of that rank's buffer.

    Pure function of the header, so sender and receiver agree without exchanging anything else."""
    items = [i for i, r in enumerate(header["owner"]) if r == rank]
    parts, off = [], 0
    for i in items:
        for j, name in enumerate(header["names"]):
            spec = header["specs"][j]
            if spec is None:
                continue
            rows = header["rows"][i][j]
            parts.append((i, name, off, rows))
            off += _align(rows * _row_bytes(spec[0], spec[1]))
    return items, parts, off


def encode_header(status: int, tag: int, ints: Sequence[int], names: Sequence[str],
                  fields: dict | None, owner: Sequence[int]) -> torch.Tensor:
    """The int64 header: [status, tag, n_ints, *ints, n_names, n_items, per name: present, dtype, ndim,
    dims x3, per item: owner, rows per name]."""
    fields = fields or {}
    out = [status, tag, len(ints), *ints, len(names), len(owner)]
    for name in names:
        rows = fields.get(name)
        if rows is None:
            out += [0] * (3 + MAX_TRAILING_DIMS)
            continue
        ref = next((t for t in rows), None)
        dtype = ref.dtype if ref is not None else torch.float32
        trailing = tuple(ref.shape[1:]) if ref is not None else ()
        if len(trailing) > MAX_TRAILING_DIMS:
            raise ValueError(f"{name}: at most {MAX_TRAILING_DIMS} trailing dims, got shape {tuple(ref.shape)}")
        for i, t in enumerate(rows):
            if t.dtype != dtype or tuple(t.shape[1:]) != trailing:
                raise ValueError(f"{name}[{i}]: {t.dtype} {tuple(t.shape)} differs from item 0's "
                                 f"{dtype} (n, {', '.join(map(str, trailing))})")
        out += [1, DTYPES.index(dtype), len(trailing), *trailing, *[0] * (MAX_TRAILING_DIMS - len(trailing))]
    for i, r in enumerate(owner):
        out.append(int(r))
        for name in names:
            rows = fields.get(name)
            if rows is not None and len(rows) != len(owner):
                raise ValueError(f"{name}: {len(rows)} items, expected {len(owner)} (one per owner entry)")
            out.append(0 if rows is None else int(rows[i].shape[0]))
    return torch.tensor(out, dtype=torch.int64)


def decode_header(h: list[int]) -> dict:
    status, tag, n_ints = h[0], h[1], h[2]
    ints = h[3:3 + n_ints]
    p = 3 + n_ints
    n_names, n_items = h[p], h[p + 1]
    p += 2
    specs = []
    for _ in range(n_names):
        present, dt, nd = h[p:p + 3]
        dims = h[p + 3:p + 3 + nd]
        specs.append((DTYPES[dt], tuple(dims)) if present else None)
        p += 3 + MAX_TRAILING_DIMS
    owner, rows = [], []
    for _ in range(n_items):
        owner.append(h[p])
        rows.append(h[p + 1:p + 1 + n_names])
        p += 1 + n_names
    return {"status": status, "tag": tag, "ints": ints, "specs": specs, "owner": owner, "rows": rows}


def pack(fields: dict, header: dict, rank: int, device) -> torch.Tensor:
    """The uint8 buffer of `rank`'s items (layout()), allocated once: sum of its rows' bytes, aligned."""
    _, parts, total = layout(header, rank)
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    for i, name, off, rows in parts:
        t = fields[name][i].contiguous()
        if rows:
            flat = t.reshape(-1).view(torch.uint8)
            buf[off:off + flat.numel()].copy_(flat)
    return buf


def unpack(buf: torch.Tensor, header: dict, rank: int) -> dict:
    """Views into `buf` (no copy): {name: [tensor per item of `rank`]}, None for absent names."""
    items, parts, _ = layout(header, rank)
    out = {name: (None if spec is None else []) for name, spec in zip(header["names"], header["specs"])}
    by_name = dict(zip(header["names"], header["specs"]))
    for _, name, off, rows in parts:
        dtype, trailing = by_name[name]
        n = rows * _row_bytes(dtype, trailing)
        out[name].append(buf[off:off + n].view(dtype).reshape(rows, *trailing))
    return out


class Transport:
    """Collective: construct on every rank in the same order (it creates the control group)."""

    def __init__(self, *, src: int = 0, wait_timeout_s: float = WAIT_TIMEOUT_S, device=None):
        self.src = src
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.wait_timeout_s = wait_timeout_s
        self.control = None
        if self.distributed:
            # Waiting for rank 0's pipeline may take minutes: it happens here, on a CPU group with its own
            # timeout, never inside an NCCL collective (whose timeout would kill the job without a word).
            self.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_timeout_s))
        if device is None:
            on_nccl = self.distributed and dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if on_nccl else torch.device("cpu")
        self.device = torch.device(device)
        self.bytes_received = 0    # by this rank in the last scatter (header + its buffer)

    def _broadcast_header(self, header: torch.Tensor | None, what: str) -> list[int]:
        if not self.distributed:
            return header.tolist()
        size = torch.tensor([0 if header is None else header.numel()], dtype=torch.int64)
        try:
            dist.broadcast(size, self.src, group=self.control)
            if self.rank != self.src:
                header = torch.empty(int(size), dtype=torch.int64)
            dist.broadcast(header, self.src, group=self.control)
        except RuntimeError as err:
            if self.rank != self.src and ("imed out" in str(err) or "imeout" in str(err)):
                raise TransportTimeout(f"rank {self.rank}: waited more than {self.wait_timeout_s:.0f} s for "
                                       f"rank {self.src}'s {what}") from err
            raise
        return header.tolist()

    def scatter(self, fields: dict | None, owner: Sequence[int] | None, *, names: Sequence[str],
                tag: int = 0, ints: Sequence[int] = (), what: str = "batch") -> dict:
        """Every rank: {"status", "tag", "ints", "items" (global indices, in order), name: [tensors] | None}.

        Rank `src` passes `fields` and `owner`; the others pass None. On rank src the tensors are its own
        (sliced, not copied); elsewhere they are views into one received buffer on `self.device`."""
        header = None
        if self.rank == self.src:
            if fields is not None:
                unknown = set(fields) - set(names)
                if unknown:
                    raise ValueError(f"fields: {sorted(unknown)} not in names")
                bad = [r for r in owner if not 0 <= r < self.world]
                if bad:
                    raise ValueError(f"owner: rank {bad[0]} outside [0, {self.world})")
            header = encode_header(STATUS_DATA, tag, ints, names, fields, owner or [])
        h = decode_header(self._broadcast_header(header, what))
        h["names"] = list(names)
        self.bytes_received = 8 * (len(h["owner"]) * (1 + len(names)) + 16)
        if self.rank == self.src:
            return self._send(fields or {}, h)
        return self._receive(h)

    def stop(self, tag: int = 0, *, what: str = "batch") -> None:
        """Rank src: tell the others there is no batch (a failure); they get status STATUS_STOP."""
        self._broadcast_header(encode_header(STATUS_STOP, tag, (), (), None, ()), what)

    def _send(self, fields: dict, h: dict) -> dict:
        # one rank at a time: rank 0 holds one packed buffer at once (stage 1: ~1 GB, not world x 1 GB)
        for r in range(self.world):
            if r == self.src:
                continue
            buf = pack(fields, h, r, self.device)
            if buf.numel():  # the receiver computed the same size and skips an empty receive too
                dist.send(buf, r)
            del buf
        items = [i for i, r in enumerate(h["owner"]) if r == self.src]
        mine = {name: (None if spec is None else [fields[name][i] for i in items])
                for name, spec in zip(h["names"], h["specs"])}
        return {"status": h["status"], "tag": h["tag"], "ints": h["ints"], "items": items, **mine}

    def _receive(self, h: dict) -> dict:
        items, _, total = layout(h, self.rank)
        buf = torch.empty(total, dtype=torch.uint8, device=self.device)
        if total and h["status"] == STATUS_DATA:
            dist.recv(buf, self.src)
        self.bytes_received += total
        mine = unpack(buf, h, self.rank) if h["status"] == STATUS_DATA else {}
        return {"status": h["status"], "tag": h["tag"], "ints": h["ints"], "items": items, **mine}
