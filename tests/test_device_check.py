"""scripts/device_check.sh --dry-run: the GPU check's plan, budget and files, and bench_zero at a tiny shape on the
CPU (plain torch, the shipped ZeRO-3 config and ZeRO-2: three real engines, one step each).

The GPU run itself needs a lent GPU machine (docs/BENCHMARKS.md); this is what can go wrong before one is spent.
"""

import json
import math
import os
import shutil
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["wheels", "preflight", "ot_fp32", "bench_ot", "bench_zero", "bench_step", "pytest", "ot_fp64"]


def _dry_run(root, out, timeout=300):
    env = dict(os.environ, OUT=str(out), PY=sys.executable, PYTHONPATH=ROOT)
    return subprocess.run(["bash", os.path.join(root, "scripts", "device_check.sh"), "--dry-run"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_plan_and_runs_bench_zero_tiny_on_the_cpu(tmp_path):
    proc = _dry_run(ROOT, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + (tmp_path / "log.txt").read_text()[-3000:]
    lines = proc.stdout.splitlines()
    planned = [ln.split()[0] for ln in lines if ln.startswith("  ") and ln.split()[0] in ORDER]
    assert planned == ORDER  # float32 before float64, the goal steps before the tests
    assert "MISSING" not in proc.stdout
    assert any(ln.startswith("planned:") and "budget of 420s" in ln for ln in lines)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["gpu"] is None
    assert set(summary["goals"]) == {"fused_sinkhorn_ms", "fused_vs_scipy_exact", "topd_opd_pipelined",
                                     "zero2_vs_plain", "zero3_vs_plain"}
    assert all(g["status"] == "not run" for g in summary["goals"].values())  # CPU figures judge no GPU goal

    bench = summary["bench_zero"]
    assert bench["meta"]["device"] == "cpu" and bench["meta"]["shape"] == "tiny"
    res = bench["results"]
    assert set(res) == {"plain", "zero3", "zero2"} and all("error" not in r for r in res.values()), res
    for r in res.values():
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert abs(r["loss_first"] - math.log(256)) < 0.2  # random init on random tokens: ~ln V
    # ZeRO-2 builds the same module from the same seed as plain torch: same first loss. ZeRO-3 builds under
    # zero.Init, which draws the initial weights in another order.
    assert abs(res["zero2"]["loss_first"] - res["plain"]["loss_first"]) < 1e-5
    assert set(bench["ratios"]) == {"zero3/plain tokens/s", "zero3/plain peak memory",
                                    "zero2/plain tokens/s", "zero2/plain peak memory"}


def test_dry_run_fails_when_a_named_script_is_missing(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "device_check.sh"), repo / "scripts")
    proc = _dry_run(str(repo), tmp_path / "out", timeout=60)
    assert proc.returncode != 0
    assert "MISSING: scripts/bench_zero.py" in proc.stdout and "MISSING: scripts/bench_ot.py" in proc.stdout


def test_without_a_gpu_the_preflight_stops_the_check_and_the_summary_says_why(tmp_path):
    # the GPU hidden, so this is the no-GPU path on every machine (on a GPU one it would run the whole check)
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0  # the check did not run: the device tool's rc says so
    assert "nothing else can run" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["preflight"] and summary["steps"][0]["rc"] == "1"
    assert summary["gpu"] is None and summary["preflight"]["can_run_ot"] is False
    assert not summary["preflight"]["modules"]["torch"].startswith("missing")
    assert all(g["status"] == "not run" for g in summary["goals"].values())


def test_summary_judges_each_goal_from_the_benchmarks_json(tmp_path):
    # The summary script the check writes, fed benchmark files of the shapes bench_ot / bench_step / bench_zero
    # write; the numbers are made up to land on each side of the goals.
    proc = subprocess.run(["bash", "-c", f'OUT={tmp_path} && source <(sed -n "/^write_summary()/,/^}}/p" '
                           f'{ROOT}/scripts/device_check.sh) && write_summary'], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [dict(costs=c, solver=s, ms=ms) for c, s, ms in [
        ("random", "scipy exact", 30.0), ("random", "triton sinkhorn float32 (600 it)", 0.5),
        ("zipf", "scipy exact", 30.0), ("zipf", "triton sinkhorn float32 (600 it)", 0.1)]]
    (tmp_path / "bench_ot.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "bench_step.json").write_text(json.dumps({"ratios": {"TOPD/OPD step time, pipelined": 1.05}}))
    zero = {"meta": {"device": "cuda", "shape": "4b"}, "ratios": {"zero2/plain tokens/s": 0.9,
                                                                 "zero3/plain tokens/s": 0.5}}
    (tmp_path / "bench_zero.json").write_text(json.dumps(zero))
    subprocess.run([sys.executable, str(tmp_path / "summarise.py"), str(tmp_path), "0"], check=True,
                   capture_output=True)
    goals = json.loads((tmp_path / "summary.json").read_text())["goals"]
    got = {k: (g["status"], g["value"]) for k, g in goals.items()}
    assert got == {"fused_sinkhorn_ms": ("fail", 0.5), "fused_vs_scipy_exact": ("pass", 60.0),
                   "topd_opd_pipelined": ("pass", 1.05), "zero2_vs_plain": ("pass", 0.9),
                   "zero3_vs_plain": ("fail", 0.5)}
    zero["meta"]["device"] = "cpu"  # CPU figures never judge a GPU goal
    (tmp_path / "bench_zero.json").write_text(json.dumps(zero))
    subprocess.run([sys.executable, str(tmp_path / "summarise.py"), str(tmp_path), "0"], check=True,
                   capture_output=True)
    goals = json.loads((tmp_path / "summary.json").read_text())["goals"]
    assert goals["zero2_vs_plain"]["status"] == goals["zero3_vs_plain"]["status"] == "not run"
