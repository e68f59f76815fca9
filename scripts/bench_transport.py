"""Bytes and seconds per step of moving teacher data: server -> rank 0 -> the training ranks, before and after.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_transport.py [--json-rows 256] [--stage2-scale 0.25]
        [--stage1-scale 0.0078125] [--repeat 3] [--md out.md] [--scoring-only] [--block-rows 2048]

Shapes (docs/SCALING.md, the paper's run): stage 2 = 4 rollouts of 9,688 response tokens after a 256-token
prompt, teacher hidden 2048, 4 training ranks (one sequence each); stage 1 = global batch 128 sequences of
16,384 tokens (the maximum), hidden 2048, 8 training ranks. Random tensors of those sizes.

server -> rank 0, per step (the whole sequence's hidden states come back, prompt included):
    before  JSON numbers (what SGLang sends: a bf16 model's values as floats): json.dumps on the server,
            json.loads + np.asarray(float32) in the client; timed on --json-rows rows, projected linearly
    after   base64 of raw bf16 (the built-in server, engines/tensor_codec.py): encode + decode, all rows
    topk    the alternative when opd.estimator=topk: 20 [logprob, id, null] triples per response position as JSON
rank 0 -> ranks, per step, measured on 2 gloo processes on this CPU (rank 0 sends, rank 1 receives):
    before  broadcast_object_list of the whole pickled Batch (float32 hidden, as the pipeline made it): every
            rank receives all of it
    after   batch_scatter.share_batch: each rank receives its own sequences, hidden in bf16
The rank-0 -> ranks rows run at --stage2-scale / --stage1-scale of the response rows (memory and time on a
shared 2-core CPU) and are projected linearly to the full shapes; the tables say which numbers are projected.

teacher.scoring server vs local (issue 23; --scoring-only prints just this table): every byte the servers send
rank 0 for one step's scoring, and rank 0's CPU seconds (time.process_time) to decode it with the client's own
parsers (json.loads + engines/sglang.py parse_*), measured on --block-rows positions of SGLang-shaped answers
and projected linearly to the step's rows:
    server  teacher: hidden states of every position (JSON numbers) + logprob of each response token;
            student: top-20 of each response position
    local   teacher: top-20 + logprob of each response token (the selection's inputs, selection.py);
            student: the same top-20; stage 1: nothing (the ranks run the teacher; `topd-ds sample` is offline)
    top-20 as nested [lp, id, null] JSON triples (before) or SGLang 0.5.23's flat base64 arrays (now)
"""

import argparse
import json
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from topd_ds.rollout.batch import Batch  # noqa: E402
from topd_ds.engines.tensor_codec import decode_tensor, encode_tensor  # noqa: E402

H, TOPK = 2048, 20
STAGES = {  # name: (sequences, prompt tokens, response tokens, training ranks)
    "stage 2 (4 x 9.7k)": (4, 256, 9688, 4),
    "stage 1 (128 x 16k)": (128, 256, 16384 - 256, 8),
}


def timed(fn, repeat):
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def server_leg(rows: int, json_rows: int, repeat: int) -> dict:
    """Per sequence of `rows` hidden rows: JSON vs base64 bytes and seconds, and the top-k JSON bytes."""
    g = torch.Generator().manual_seed(0)
    block = (3 * torch.randn(json_rows, H, generator=g)).bfloat16()
    as_list = block.float().tolist()

    def json_round():
        text = json.dumps(as_list)
        return text, np.asarray(json.loads(text), dtype=np.float32)
    json_s, (text, _) = timed(json_round, repeat)
    scale = rows / json_rows
    full = (3 * torch.randn(rows, H, generator=g)).bfloat16()

    def b64_round():
        obj = encode_tensor(full)
        text = json.dumps(obj)
        return text, decode_tensor(json.loads(text), "h")
    b64_s, (b64_text, back) = timed(b64_round, repeat)
    assert torch.equal(back, full)
    topk = [[[-float(i) / 7, 100_000 + i, None] for i in range(TOPK)] for _ in range(json_rows)]
    return {"json_bytes": len(text) * scale, "json_s": json_s * scale, "b64_bytes": len(b64_text), "b64_s": b64_s,
            "topk_bytes_per_row": len(json.dumps(topk)) / json_rows}


def _answer_text(kind: str, rows: int, k: int, seed: int = 0) -> str:
    """The JSON text of one SGLang /generate item carrying `rows` scored positions of one kind (float32 values
    written as SGLang's .tolist() writes them: Python floats of float32 numbers)."""
    from topd_ds.engines.hf_engine import flat_top_fields

    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(3 * torch.randn(rows, 4 * k, generator=g), -1)       # only the top k are read
    ids = torch.randint(0, 151_936, (rows + 1,), generator=g).tolist()
    if kind == "hidden":       # hidden_states: [prefill block (rows, H)] of a bf16 model, as JSON numbers
        return json.dumps([{"meta_info": {"hidden_states": [(3 * torch.randn(rows, H, generator=g)).bfloat16().float().tolist()]}}])
    if kind == "token":        # input_token_logprobs: [null, id, null] then [lp, id, null] per position
        vals = lp[:, 0].tolist()
        meta = {"input_token_logprobs": [[None, ids[0], None]] + [[v, t, None] for v, t in zip(vals, ids[1:])]}
    elif kind == "topk_nested":
        v, i = lp.topk(k, -1)
        meta = {"input_top_logprobs": [None] + [[[a, b + 100_000, None] for a, b in zip(vr, ir)]
                                                for vr, ir in zip(v.tolist(), i.tolist())]}
    else:                      # topk_flat: base64 float32 / int32 arrays
        meta = flat_top_fields(lp, k, b64=True)
    return json.dumps([{"meta_info": meta}])


def _decode_cost(kind: str, rows: int, k: int, repeat: int) -> tuple[float, float]:
    """(bytes, CPU seconds) per position of decoding one answer of `kind` with the client's parser."""
    from topd_ds.engines import sglang as sg

    text = _answer_text(kind, rows, k)

    def decode():
        meta = json.loads(text)[0]["meta_info"]
        if kind == "hidden":
            return sg.parse_hidden(meta["hidden_states"], rows, H, "h")
        if kind == "token":
            entries = meta["input_token_logprobs"]
            return sg.parse_token_logprobs(entries, [e[1] for e in entries], "t", first_null=True)
        if kind == "topk_nested":
            return sg.parse_top_logprobs(meta["input_top_logprobs"][1:], k, "t")
        return sg.parse_flat_top_logprobs(meta, rows + 1, k, 1, "t")
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        decode()
        times.append(time.process_time() - t0)
    return len(text) / rows, statistics.median(times) / rows


def scoring_table(json_rows: int, block_rows: int, repeat: int) -> list[str]:
    """Server -> rank 0 bytes and rank-0 decode CPU seconds per step, teacher.scoring server vs local."""
    per = {kind: _decode_cost(kind, block_rows, TOPK, repeat) for kind in ("token", "topk_nested", "topk_flat")}
    hid_b, hid_s = _decode_cost("hidden", json_rows, TOPK, repeat)   # JSON hidden states: bytes and s per row
    lines = [f"### Scoring: servers -> rank 0 per step, teacher.scoring server vs local (top-{TOPK}, hidden {H})", "",
             "| step | scoring | what comes back | bytes | rank-0 decode CPU s |", "|---|---|---|---|---|"]
    for name, (n_seq, prompt, response, _) in STAGES.items():
        L, R = prompt + response, response
        stage2 = name.startswith("stage 2")
        parts = {
            "server (before issue 23)": [("teacher hidden (JSON)", n_seq * L, hid_b, hid_s), ("teacher token logprobs", n_seq * R, *per["token"])]
            + ([("student top-20 (nested JSON)", n_seq * R, *per["topk_nested"])] if stage2 else []),
            "server (now)": [("teacher hidden (JSON)", n_seq * L, hid_b, hid_s), ("teacher token logprobs", n_seq * R, *per["token"])]
            + ([("student top-20 (flat base64)", n_seq * R, *per["topk_flat"])] if stage2 else []),
            "local": ([("teacher top-20 + token logprobs, student top-20 (flat base64)", n_seq * R,
                        2 * per["topk_flat"][0] + per["token"][0], 2 * per["topk_flat"][1] + per["token"][1])]
                      if stage2 else [("nothing (the ranks run the teacher)", 0, 0.0, 0.0)]),
        }
        for label, items in parts.items():
            nbytes = sum(n * b for _, n, b, _ in items)
            secs = sum(n * t for _, n, _, t in items)
            what = "; ".join(w for w, *_ in items)
            lines.append(f"| {name} | {label} | {what} | {fmt_bytes(nbytes)} | {secs:.2f} |")
    lines += ["", f"per position: hidden JSON {fmt_bytes(hid_b)} / {hid_s * 1e3:.2f} ms = {H / hid_s / 1e6:.2f}M floats/s "
              f"(measured on {json_rows} rows); "
              f"token logprob {per['token'][0]:.0f} B / {per['token'][1] * 1e6:.1f} us; top-{TOPK} nested "
              f"{per['topk_nested'][0]:.0f} B / {per['topk_nested'][1] * 1e6:.1f} us; top-{TOPK} flat base64 "
              f"{per['topk_flat'][0]:.0f} B / {per['topk_flat'][1] * 1e6:.2f} us (measured on {block_rows} positions).", ""]
    return lines


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(n_seq, prompt, response, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 151_936, (prompt + response,), generator=g).tolist() for _ in range(n_seq)]
    return Batch(step=1, weight_version=0, sequences=seqs, prompt_lens=[prompt] * n_seq,
                 teacher_hidden=[torch.randn(response, H, generator=g) for _ in range(n_seq)],
                 teacher_token_logprobs=[-torch.rand(response, generator=g) for _ in range(n_seq)],
                 marked=[torch.zeros(response, dtype=torch.bool) for _ in range(n_seq)])


def _rank_worker(rank, port, n_seq, prompt, response, repeat, out):
    import torch.distributed as dist

    from topd_ds.comm.batch_scatter import share_batch
    from topd_ds.comm.transport import Transport

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tp = Transport()
    batch = make_batch(n_seq, prompt, response) if rank == 0 else None
    res = {"pickle_s": [], "scatter_s": []}
    for _ in range(repeat):  # methods take turns, so a busy moment of the shared CPU hits both
        dist.barrier()
        t0 = time.perf_counter()
        box = [batch]
        dist.broadcast_object_list(box, src=0)
        got = box[0]
        res["pickle_s"].append(time.perf_counter() - t0)
        if rank == 1:
            res["pickle_bytes"] = len(pickle.dumps(got))
        del got, box
        dist.barrier()
        t0 = time.perf_counter()
        local = share_batch(tp, batch if rank == 0 else None, step=1, hidden_dtype=torch.bfloat16)
        res["scatter_s"].append(time.perf_counter() - t0)
        res["scatter_bytes"] = tp.bytes_received
        res["local_sequences"] = len(local.sequences)
        del local
    if rank == 1:
        torch.save(res, out)
    dist.destroy_process_group()


def rank_leg(n_seq, prompt, response, repeat) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.pt")
        mp.spawn(_rank_worker, args=(_free_port(), n_seq, prompt, response, repeat, out), nprocs=2, join=True)
        res = torch.load(out)
    return {"pickle_s": statistics.median(res["pickle_s"]), "scatter_s": statistics.median(res["scatter_s"]),
            "pickle_bytes": res["pickle_bytes"], "scatter_bytes": res["scatter_bytes"],
            "local_sequences": res["local_sequences"]}


def fmt_bytes(n):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json-rows", type=int, default=256, help="rows JSON-encoded for the timing (projected)")
    ap.add_argument("--stage2-scale", type=float, default=0.25, help="fraction of stage-2 response rows sent between ranks")
    ap.add_argument("--stage1-scale", type=float, default=1 / 128, help="fraction of stage-1 sequences sent between ranks")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--md", default=None, help="also write the tables here")
    ap.add_argument("--scoring-only", action="store_true", help="only the teacher.scoring server vs local table")
    ap.add_argument("--block-rows", type=int, default=2048, help="positions per decoded answer (scoring table)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = scoring_table(args.json_rows, args.block_rows, args.repeat)
    print("\n".join(lines), flush=True)
    if args.scoring_only:
        if args.md:
            with open(args.md, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    for name, (n_seq, prompt, response, world) in STAGES.items():
        seq_len = prompt + response
        srv = server_leg(seq_len, args.json_rows, args.repeat)
        # rank leg at a reduced size: stage 2 keeps 2 sequences (one per rank) with fewer rows; stage 1 keeps
        # a fraction of the sequences at full length; both projected to the full step below
        if name.startswith("stage 2"):
            r_rows = max(1, int(response * args.stage2_scale))
            meas = rank_leg(2, prompt, r_rows, args.repeat)
            proj = response / r_rows            # per rank: one sequence each, full length
            per_rank_seqs_after = n_seq / world
            before_per_rank = meas["pickle_bytes"] / 2 * n_seq * proj   # the measured batch had 2 sequences
            before_s = meas["pickle_s"] / 2 * n_seq * proj
            after_per_rank = meas["scatter_bytes"] * proj * per_rank_seqs_after
            after_s = meas["scatter_s"] * proj * per_rank_seqs_after
        else:
            m_seq = max(2, int(round(n_seq * args.stage1_scale)))
            meas = rank_leg(m_seq, prompt, response, args.repeat)
            before_per_rank = meas["pickle_bytes"] * n_seq / m_seq
            before_s = meas["pickle_s"] * n_seq / m_seq
            got = meas["local_sequences"]   # rank 1 of 2 got half the measured sequences
            after_per_rank = meas["scatter_bytes"] / got * (n_seq / world)
            after_s = meas["scatter_s"] / got * (n_seq / world)
        lines += [f"### {name}: {n_seq} sequences x {seq_len} tokens, hidden {H}, {world} training ranks", "",
                  "| leg | before: bytes | before: s | after: bytes | after: s | ratio (bytes) |",
                  "|---|---|---|---|---|---|",
                  f"| server -> rank 0, hidden states (JSON vs base64 bf16) | {fmt_bytes(srv['json_bytes'] * n_seq)} "
                  f"| {srv['json_s'] * n_seq:.1f} (projected from {args.json_rows} rows) | {fmt_bytes(srv['b64_bytes'] * n_seq)} "
                  f"| {srv['b64_s'] * n_seq:.2f} | {srv['json_bytes'] / srv['b64_bytes']:.1f}x |",
                  f"| server -> rank 0, teacher top-{TOPK} instead (estimator topk) | - | - "
                  f"| {fmt_bytes(srv['topk_bytes_per_row'] * response * n_seq)} (JSON) | - | "
                  f"{srv['json_bytes'] / (srv['topk_bytes_per_row'] * response):.0f}x fewer than hidden JSON |",
                  f"| rank 0 -> each rank (pickle broadcast vs own rows in bf16) | {fmt_bytes(before_per_rank)} "
                  f"| {before_s:.2f} (projected) | {fmt_bytes(after_per_rank)} | {after_s:.2f} (projected) "
                  f"| {before_per_rank / after_per_rank:.1f}x |",
                  f"| rank 0 -> all ranks, total sent | {fmt_bytes(before_per_rank * (world - 1))} | | "
                  f"{fmt_bytes(after_per_rank * (world - 1))} | | {before_per_rank / after_per_rank:.1f}x |", "",
                  f"measured between 2 gloo ranks: pickle {fmt_bytes(meas['pickle_bytes'])} in {meas['pickle_s']:.2f} s, "
                  f"scatter {fmt_bytes(meas['scatter_bytes'])} to rank 1 in {meas['scatter_s']:.2f} s "
                  f"(rank 1 trained on {meas['local_sequences']} sequence(s)); JSON {fmt_bytes(srv['json_bytes'] / seq_len)}/row "
                  f"= {srv['json_bytes'] / seq_len / H:.1f} bytes a float, base64 bf16 {srv['b64_bytes'] / seq_len / H:.2f}.", ""]
        print("\n".join(lines[-12:]), flush=True)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
