"""scripts/replicate.py: every finished run is appended to OUT/runs.jsonl at once, and a rerun skips it."""

import importlib.util
import json
import os
import sys

import pytest

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
            "history": [{"time/step_s": 0.5}] * int(kv["train.steps"])}))

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
    assert lines[0] == {"before": 0.4, "after": 0.5, "steps": 4, "train_wall_s": 2.0, "name": "opd-s0",
                        "row": "opd", "seed": 0}
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
