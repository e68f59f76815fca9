"""One student training step, plain torch vs the shipped ZeRO-3 config vs ZeRO-2: tokens/s, peak memory, ratios.

    python scripts/bench_zero.py [--shape 4b|1.7b|tiny] [--seq 4096] [--steps 3 --warmup 1]
        [--variants plain,zero3,zero2] [--device cuda|cpu] [--json out.json]
    python scripts/bench_zero.py --shape tiny --device cpu --seq 64      # the CPU check (seconds, tests run it)

A Qwen3-shaped student (4b: Qwen3-4B, hidden 2560, 36 layers, vocabulary 151,936, tied embeddings; 1.7b:
Qwen3-1.7B; tiny: 2 layers of 64), random init from one seed, batch 1 at sequence --seq, gradient checkpointing,
loss = next-token cross-entropy on random tokens, one optimizer step per step:
  * plain: torch module in bf16 on the GPU (float32 on the CPU) + torch AdamW (fused on CUDA);
  * zero3: `ds_configs/zero3.json` as shipped, its "auto" keys filled by `topd_ds.config.resolve_deepspeed_config`
    (micro batch 1, global batch 1), the model built under zero.Init;
  * zero2: `ds_configs/zero2.json`, likewise.
Each variant runs in its own process, one after the other (memory is measured alone; a finished engine cannot
leak into the next), with `--variant-timeout` seconds each. World size 1: a single GPU (ZeRO's partitioning buys
nothing there; what is measured is its overhead against plain torch, the issue-19 goal being >= 0.8x).
Per variant: seconds per step (mean of the timed steps), tokens/s, peak memory (CUDA: max_memory_allocated;
CPU: peak RSS of the process), the first step's loss (same init and data: equal across variants to rounding).
Ratios: tokens/s of each variant over plain's, measured in this one run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # Qwen3 configs (hub config.json of Qwen/Qwen3-4B and Qwen/Qwen3-1.7B); tiny for the CPU check
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256),
}
VARIANTS = {"plain": None, "zero3": "ds_configs/zero3.json", "zero2": "ds_configs/zero2.json"}


def model_config(shape: str, seq: int):
    from transformers import Qwen3Config

    return Qwen3Config(**SHAPES[shape], max_position_embeddings=max(seq, 4096), rope_theta=1_000_000.0,
                       tie_word_embeddings=True, use_cache=False)


def ds_config(path: str, on_gpu: bool) -> dict:
    """The shipped ZeRO JSON with its "auto" keys filled as the trainer fills them (batch 1, one rank)."""
    sys.path.insert(0, ROOT)
    from topd_ds.config import config_from_dict, resolve_deepspeed_config

    cfg = config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                            "rollout": {"prompts_per_step": 1, "n_per_prompt": 1},
                            "train": {"deepspeed_config": os.path.join(ROOT, path), "global_batch_size": 1,
                                      "micro_batch_size": 1}}, check_paths=False)
    return resolve_deepspeed_config(cfg, world_size=1, on_gpu=on_gpu)


def peak_memory_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def worker(args) -> dict:
    """One variant in this process -> its result dict."""
    import torch

    sys.path.insert(0, ROOT)
    from topd_ds.comm import distributed

    on_gpu = args.device == "cuda"
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    from transformers import AutoModelForCausalLM

    mcfg = model_config(args.shape, args.seq)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, mcfg.vocab_size, (1, args.seq), generator=g) for _ in range(args.warmup + args.steps)]
    t_build = time.perf_counter()
    torch.manual_seed(0)
    if args.variant == "plain":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=2e-6, betas=(0.9, 0.95), fused=on_gpu)

        def step(ids):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        distributed.init_distributed()
        conf = ds_config(VARIANTS[args.variant], on_gpu)
        keep = HfDeepSpeedConfig(conf) if conf["zero_optimization"]["stage"] == 3 else None  # noqa: F841 zero.Init
        if keep is None:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine, _, _, _ = deepspeed.initialize(model=model, config=conf,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
        unset_hf_deepspeed_config()

        def step(ids):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            return loss
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    build_s = time.perf_counter() - t_build
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for i, ids in enumerate(batches):
        t0 = time.perf_counter()
        loss = step(ids.to(device))
        sync()
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    return dict(variant=args.variant, config=VARIANTS[args.variant], step_s=step_s, tokens_per_s=args.seq / step_s,
                peak_mem_mb=peak_memory_mb(device), build_s=build_s, loss_first=losses[0], losses=losses,
                params=sum(p.numel() for p in model.parameters()) if args.variant != "zero3" else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="4b")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernels, buckets)")
    ap.add_argument("--variants", default="plain,zero3,zero2")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when torch sees a GPU")
    ap.add_argument("--variant-timeout", type=float, default=300.0, help="seconds per variant process")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    for v in variants:
        if VARIANTS[v] and not os.path.exists(os.path.join(ROOT, VARIANTS[v])):
            ap.error(f"--variants: {v} needs {VARIANTS[v]}, which does not exist")
    if args.variant:  # the child
        with open(args.result, "w") as f:
            json.dump(worker(args), f)
        return 0

    t0 = time.time()
    results = {}
    for v in variants:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--result", out.name,
                   "--shape", args.shape, "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--device", args.device]
            # a fresh rendezvous per variant: a MASTER_PORT inherited from a parent that already started
            # torch.distributed (pytest's in-process engines) is still bound there -> EADDRINUSE
            env = {k: val for k, val in os.environ.items()
                   if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
            try:
                proc = subprocess.run(cmd, env=env, timeout=args.variant_timeout, capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                results[v] = dict(variant=v, error=f"timed out after {args.variant_timeout:.0f} s")
                print(f"{v}: timed out", flush=True)
                continue
            if proc.returncode != 0:
                results[v] = dict(variant=v, error=proc.stderr.strip().splitlines()[-1:] or [f"rc {proc.returncode}"])
                print(f"{v}: failed\n{proc.stderr[-3000:]}", flush=True)
                continue
            results[v] = json.load(open(out.name))
            r = results[v]
            print(f"{v}: {r['tokens_per_s']:.0f} tokens/s, {r['step_s']:.3f} s/step, peak {r['peak_mem_mb']:.0f} MB, "
                  f"first loss {r['loss_first']:.5f}, build {r['build_s']:.1f} s", flush=True)
    ok = {v: r for v, r in results.items() if "error" not in r}
    ratios = {}
    if "plain" in ok:
        for v, r in ok.items():
            if v != "plain":
                ratios[f"{v}/plain tokens/s"] = r["tokens_per_s"] / ok["plain"]["tokens_per_s"]
                ratios[f"{v}/plain peak memory"] = r["peak_mem_mb"] / ok["plain"]["peak_mem_mb"]
    losses = [r["loss_first"] for r in ok.values()]
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)), wall_s=round(time.time() - t0, 1),
                shape=args.shape, seq=args.seq, steps=args.steps, warmup=args.warmup, device=args.device,
                first_loss_spread=(max(losses) - min(losses)) if losses else None)
    print(json.dumps(dict(meta=meta, ratios=ratios), indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results, ratios=ratios), f, indent=1)
    return 0 if len(ok) == len(variants) else 1


if __name__ == "__main__":
    raise SystemExit(main())
