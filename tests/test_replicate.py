"""scripts/replicate.py: every finished run is appended to OUT/runs.jsonl at once (and copied under docs/records),
a rerun skips it; the statistics it prints (topd_ds.studies.stats) against hand-computed examples."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from topd_ds.studies import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def replicate(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("replicate_script", os.path.join(REPO, "scripts", "replicate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "REPO", str(tmp_path))
    (tmp_path / "warm").mkdir()
    calls = []

    def fake_train(args, *overrides):
        """Stands in for `topd-ds train`: writes the summary.json a finished run leaves; fails on request."""
        kv = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("-"))
        name = kv["train.run_name"]
        calls.append(name)
        if name in fail_on:
            raise RuntimeError(f"killed during {name}")
        seed = int(kv["train.seed"])
        run = tmp_path / kv["train.out_dir"] / name
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({
            "steps": int(kv["train.steps"]), "eval": {"0": 0.4, kv["train.steps"]: 0.5 + seed / 100},
            "history": [{"time/step_s": 0.5, "cost/tokens_generated": 100.0, "cost/tokens_trained": 120.0}]
            * int(kv["train.steps"])}))

    fail_on = set()
    monkeypatch.setattr(mod, "train", fake_train)
    return mod, calls, fail_on, tmp_path


def _main(mod, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["replicate.py", "--warm-start", "warm", "--out", "out", "--steps", "4", *argv])
    mod.main()


def test_each_run_is_appended_when_it_finishes_and_skipped_on_rerun(replicate, monkeypatch):
    mod, calls, fail_on, root = replicate
    fail_on.add("topd-s0")  # the study dies during its third run
    with pytest.raises(RuntimeError, match="killed during topd-s0"):
        _main(mod, monkeypatch, "--seeds", "0", "1", "--rows", "opd", "opd_dw_low_ot", "topd")
    lines = [json.loads(x) for x in (root / "out" / "runs.jsonl").read_text().splitlines()]
    assert [r["name"] for r in lines] == ["opd-s0", "opd_dw_low_ot-s0"]  # written before the crash
    assert lines[0] == {"before": 0.4, "after": 0.5, "steps": 4, "train_wall_s": 2.0, "tokens_generated": 400.0,
                        "tokens_trained": 480.0, "name": "opd-s0", "row": "opd", "seed": 0, "eval_set": "test",
                        "eval_samples": 500, "lr": 2e-4, "warm_start": "warm", "overrides": []}
    # the committed copy of the raw records (docs/records/OUTNAME.runs.jsonl) follows every append
    assert (root / "docs" / "records" / "out.runs.jsonl").read_text() == (root / "out" / "runs.jsonl").read_text()
    fail_on.clear()
    calls.clear()
    _main(mod, monkeypatch, "--seeds", "0", "1", "--rows", "opd", "opd_dw_low_ot", "topd")
    assert calls == ["topd-s0", "opd-s1", "opd_dw_low_ot-s1", "topd-s1"]  # the finished two are not rerun
    names = [json.loads(x)["name"] for x in (root / "out" / "runs.jsonl").read_text().splitlines()]
    assert sorted(names) == sorted({*names}) and len(names) == 6  # each run once
    table = json.loads((root / "out" / "results.json").read_text())["rows"]
    assert table["opd"]["after"] == pytest.approx([50.0, 51.0])


def test_a_torn_last_line_is_ignored_and_the_run_redone(replicate, monkeypatch):
    mod, calls, _, root = replicate
    _main(mod, monkeypatch, "--seeds", "0", "--rows", "opd")
    with open(root / "out" / "runs.jsonl", "a") as f:
        f.write('{"name": "topd-s0", "bef')  # killed mid-write
    calls.clear()
    _main(mod, monkeypatch, "--seeds", "0", "--rows", "opd", "topd")
    assert calls == ["topd-s0"]
    assert sorted(mod.finished_runs(mod.argparse.Namespace(out="out"))) == ["opd-s0", "topd-s0"]


def test_a_missing_warm_start_is_trained_as_its_own_run(replicate, monkeypatch):
    # runs/arith-kd/final missing: `topd-ds sample` and stage 1 run as run arith-kd under runs/, so the student lands
    # where --warm-start says (not in the config's run_name, which `make demo` uses for another task).
    mod, calls, _, root = replicate
    seen = []

    class Stop(Exception):
        pass

    def fake_stage1(args, *overrides):
        seen.append(("train", overrides))
        raise Stop

    monkeypatch.setattr(mod.subprocess, "run", lambda cmd, **kw: seen.append(("sample", tuple(cmd))))
    monkeypatch.setattr(mod, "train", fake_stage1)
    monkeypatch.setattr(sys, "argv", ["replicate.py", "--warm-start", "runs/arith-kd/final", "--configs", "configs/demo"])
    with pytest.raises(Stop):
        mod.main()
    (kind1, sample), (kind2, stage1) = seen
    assert kind1 == "sample" and kind2 == "train"
    for cmd in (sample, stage1):
        assert "train.out_dir=runs" in cmd and "train.run_name=arith-kd" in cmd
        assert os.path.join("configs/demo", "stage1_kd.yaml") in cmd


def test_row_and_paired_statistics_match_a_hand_computed_example():
    # a = [70, 72, 75]: mean 217/3, squared deviations 49/9 + 1/9 + 64/9 = 38/3, variance 19/3, SE sqrt(19/9)
    r = stats.row_stats([70, 72, 75])
    assert r["n"] == 3 and r["mean"] == pytest.approx(217 / 3)
    assert r["sd"] == pytest.approx((19 / 3) ** 0.5) and r["se"] == pytest.approx((19 / 9) ** 0.5)
    # paired with b = [68, 71, 70]: d = [2, 1, 5], mean 8/3, variance ((2/3)^2 + (5/3)^2 + (7/3)^2) / 2 = 13/3,
    # SE sqrt(13/9) = sqrt(13)/3, t = 8/sqrt(13), df 2; t_{0.975, 2} = 4.302652729749464 (tables: 4.303)
    p = stats.paired_difference([70, 72, 75], [68, 71, 70])
    assert (p["n"], p["df"]) == (3, 2)
    assert p["mean"] == pytest.approx(8 / 3) and p["se"] == pytest.approx(13 ** 0.5 / 3)
    assert p["t"] == pytest.approx(8 / 13 ** 0.5)
    half = 4.302652729749464 * 13 ** 0.5 / 3
    assert p["ci"] == pytest.approx((8 / 3 - half, 8 / 3 + half))  # [-2.504, 7.838]
    assert 0.1 < p["p"] < 0.2  # two-sided p of t = 2.219 at 2 df: 0.157
    # paired is not unpaired: a constant shift has zero SE whatever the rows' own spread
    assert stats.paired_difference([1, 5, 9], [0, 4, 8])["se"] == 0


def test_seeds_for_power_against_the_normal_approximation():
    # n ~ ((z_.975 + z_.8) sd / delta)^2 = (2.8016 * 4.2 / 3)^2 = 15.4; the exact t test needs a little more
    n = stats.seeds_for_power(4.2, 3.0)
    assert 16 <= n <= 19, n
    assert stats.seeds_for_power(4.2, 6.0) < n


def test_the_script_writes_the_statistics_and_names_sd_and_se(replicate, monkeypatch, capsys):
    mod, _, _, root = replicate
    _main(mod, monkeypatch, "--seeds", "0", "1", "2", "--rows", "opd", "topd")
    res = json.loads((root / "out" / "results.json").read_text())["stats"]
    # the fake run's after = 0.5 + seed / 100 for every row: identical rows, zero paired difference
    assert res["rows"]["opd"]["mean"] == pytest.approx(51.0) and res["rows"]["opd"]["sd"] == pytest.approx(1.0)
    assert res["pairs"]["opd - topd"]["mean"] == 0 and res["pairs"]["opd - topd"]["seeds"] == [0, 1, 2]
    out = capsys.readouterr().out
    assert "SD over seeds" in out and "SE of the mean" in out and "95% interval (t)" in out


def test_val_split_runs_are_named_apart_and_score_on_val(replicate, monkeypatch):
    mod, calls, _, root = replicate
    (root / "cfg").mkdir()
    (root / "cfg" / "topd.yaml").write_text("data:\n  eval: data/eval.jsonl\n")
    with pytest.raises(SystemExit, match="val.jsonl missing"):  # before any run
        _main(mod, monkeypatch, "--configs", "cfg", "--eval-set", "val", "--seeds", "0", "--rows", "opd")
    assert calls == []
    (root / "data").mkdir()
    (root / "data" / "val.jsonl").write_text("{}\n")
    seen = []
    monkeypatch.setattr(mod, "train", lambda args, *o: (seen.append(o), calls.append(o)) and None or
                        _fake_summary(root, o))
    _main(mod, monkeypatch, "--configs", "cfg", "--eval-set", "val", "--seeds", "0", "--rows", "opd")
    assert "data.eval=data/val.jsonl" in seen[0] and "train.run_name=val-opd-s0" in seen[0]


def _fake_summary(root, overrides):
    kv = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("-"))
    run = root / kv["train.out_dir"] / kv["train.run_name"]
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 1, "eval": {"0": 0.4, "1": 0.5}, "history": []}))


def test_campaign_report_recomputes_the_tables_from_records(tmp_path, capsys):
    """scripts/campaign_report.py on hand-made records: settings by name without the seed, the validation sweep's
    row, and the test rows' paired difference with the docstring example of stats.paired_difference."""
    import math

    from topd_ds.studies.stats import seeds_for_power

    spec = importlib.util.spec_from_file_location("campaign_report", os.path.join(REPO, "scripts", "campaign_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def rec(name, seed, after, eval_set="test"):
        return {"name": f"{name}-s{seed}", "row": name.split("-")[-1], "seed": seed, "eval_set": eval_set,
                "before": 0.6, "after": after, "tokens_generated": 100.0, "tokens_trained": 50.0 * (1 + seed % 3),
                "train_wall_s": 10.0}

    records = [rec("opd", s, a) for s, a in zip((0, 1, 2), (0.70, 0.72, 0.75))]
    records += [rec("topd", s, a) for s, a in zip((0, 1, 2), (0.68, 0.71, 0.70))]
    records += [rec("val-lr1e-4-opd", s, a, "val") for s, a in zip((100, 101), (0.80, 0.90))]
    path = tmp_path / "x.runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report.main(["--records", str(path)])
    out = capsys.readouterr().out
    assert "| val-lr1e-4-opd | 2 | 85.0 | 7.1 | 5.0 | 60.0 | 225 | 10 |" in out  # SD sqrt(50), SE 5
    assert "| opd - topd | 3 | +2.7 |" in out and "| 2.22 | 2 |" in out  # d = [2, 1, 5]: t = 8 / sqrt(13)
    assert "| topd - warm start | 3 | +9.7 |" in out  # (68 + 71 + 70) / 3 - 60
    assert f"-> {seeds_for_power(math.sqrt(13 / 3), 3.0)} seeds for a 3-point" in out
    assert "| topd | 200 | 1.00x | 10 |" in out  # the mean of 150, 200, 250 tokens per run, as OPD's


def _campaign():
    spec = importlib.util.spec_from_file_location("campaign_script", os.path.join(REPO, "scripts", "campaign.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matched_steps_give_opd_the_tokens_of_thirty_topd_steps(tmp_path):
    """Table 2 at matched cost: OPD steps = 30 x (mean TOPD tokens / mean OPD tokens) over the test runs only
    (validation and tagged runs of the same rows are not the rows' cost)."""
    def rec(name, seed, gen, trained):
        return {"name": f"{name}-s{seed}", "seed": seed, "tokens_generated": gen, "tokens_trained": trained}

    records = [rec("opd", 0, 100.0, 100.0), rec("opd", 1, 120.0, 80.0),             # mean 200
               rec("topd", 0, 250.0, 120.0), rec("topd", 1, 230.0, 140.0),          # mean 370: 1.85x
               rec("val-lr2e-4-opd", 100, 1.0, 1.0), rec("newform-topd", 0, 1e6, 0.0)]
    path = tmp_path / "c.runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _campaign().matched_steps(str(path)) == 56          # round(30 x 1.85 = 55.5)
    assert _campaign().matched_steps(str(path), steps=10) == 18


def test_campaign_dry_run_lists_each_seed_with_the_matched_cost_row():
    out = subprocess.run([sys.executable, "scripts/campaign.py", "--dry-run", "--steps", "3", "--alt-seeds", "2"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    alt = [line for line in out.splitlines() if "runs/campaign-deque-alt" in line]
    # per seed: the headline rows, the new form, OPD at matched cost; then all seeds again for the tables
    assert len(alt) == 9 and all("--warm-start runs/deque-alt-kd/final" in line for line in alt)
    assert sum("--tag matched --steps" in line for line in alt) == 3
    assert "--seeds 0 1 " in alt[-1]


def test_eval_curves_average_each_step_over_seeds(tmp_path):
    spec = importlib.util.spec_from_file_location("eval_curves", os.path.join(REPO, "scripts", "eval_curves.py"))
    curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curves)
    for name, ev in (("val-curve-opd-s100", {"0": 0.9, "5": 0.8, "10": 0.85}), ("val-curve-opd-s101", {"0": 0.9, "5": 0.7}),
                     ("val-curve-topd-s100", {"0": 0.9, "10": 0.6})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"eval": ev}))
    got = curves.read_curves(sorted(str(p) for p in tmp_path.iterdir()))
    assert got == {"val-curve-opd": {100: {0: 90.0, 5: 80.0, 10: 85.0}, 101: {0: 90.0, 5: 70.0}},
                   "val-curve-topd": {100: {0: 90.0, 10: 60.0}}}
    table = curves.markdown(got)
    assert "| 5 | 75.0 (80.0 / 70.0) | - |" in table                 # the step TOPD never evaluated
    assert "| 10 | 85.0 (85.0) | 60.0 (60.0) |" in table
