"""Config validation: every malformed config gives one error line naming the key path."""

import json
import os

import pytest
import yaml

from topd_ds.config import (Config, ConfigError, describe_config, load_config, load_deepspeed_json,
                            resolve_deepspeed_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    """The shipped configs name repo-relative paths, as a user runs them from the checkout: so does each test
    here, wherever pytest was started."""
    monkeypatch.chdir(REPO)


@pytest.fixture()
def paths(tmp_path):
    (tmp_path / "student").mkdir()
    (tmp_path / "teacher").mkdir()
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+2="}\n')
    ds = json.load(open("ds_configs/zero3.json"))
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    return tmp_path


def base(paths) -> dict:
    return {
        "model": {"student": str(paths / "student"), "teacher": str(paths / "teacher")},
        "data": {"prompts": str(paths / "prompts.jsonl")},
        "rollout": {"n_per_prompt": 4, "prompts_per_step": 2},
        "train": {"deepspeed_config": str(paths / "zero3.json"), "global_batch_size": 8, "micro_batch_size": 2},
    }


def write(paths, data) -> str:
    p = paths / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_valid_config_loads_with_paper_defaults(paths):
    cfg = load_config(write(paths, base(paths)))
    assert isinstance(cfg, Config)
    assert cfg.topd.window == 50 and cfg.topd.false_alarm_quantile == 0.3 and cfg.kd.kd_ratio == 0.5
    assert cfg.rollout.temperature == 1.0 and cfg.train.warmup_ratio == 0.05 and cfg.train.grad_clip == 1.0
    assert abs(cfg.topd.candidate_fraction - 218 / 9688) < 1e-4


def test_overrides_apply_and_are_typed(paths):
    cfg = load_config(write(paths, base(paths)), ["topd.window=7", "topd.mode=opd", "ot.eps=0.05"])
    assert cfg.topd.window == 7 and cfg.topd.mode == "opd" and cfg.ot.eps == 0.05


def test_config_is_frozen(paths):
    cfg = load_config(write(paths, base(paths)))
    with pytest.raises(Exception):
        cfg.train.steps = 3


MALFORMED = [
    # (change applied to the base dict, expected message fragment)
    (lambda d: d["topd"].update(window=0), "topd.window: must be >= 1, got 0"),
    (lambda d: d["topd"].update(windw=5), "topd.windw: unknown key"),
    (lambda d: d.update(trainer={"steps": 3}), "trainer: unknown key"),
    (lambda d: d["train"].update(steps="ten"), "train.steps: expected an integer, got 'ten'"),
    (lambda d: d["train"].update(steps=2.5), "train.steps: expected an integer, got 2.5"),
    (lambda d: d["train"].update(lr=-1e-5), "train.lr: must be > 0, got -1e-05"),
    (lambda d: d["topd"].update(mode="tpod"), "topd.mode: must be one of 'opd', 'opd_dw_low_ot', 'opd_dw_high_ot', 'topd', got 'tpod'"),
    (lambda d: d["topd"].update(false_alarm_quantile=1.5), "topd.false_alarm_quantile: must be <= 1, got 1.5"),
    (lambda d: d["model"].update(gradient_checkpointing="yes"), "model.gradient_checkpointing: expected true/false, got 'yes'"),
    (lambda d: d["model"].update(student="/nonexistent/student"), "model.student: directory not found: /nonexistent/student"),
    (lambda d: d["data"].update(prompts="/nonexistent.jsonl"), "data.prompts: file not found: /nonexistent.jsonl"),
    (lambda d: d["train"].update(deepspeed_config="/nope.json"), "train.deepspeed_config: file not found: /nope.json"),
    (lambda d: d["train"].update(global_batch_size=6), "train.global_batch_size: must equal rollout.prompts_per_step * rollout.n_per_prompt = 8"),
    (lambda d: d["rollout"].update(top_p=0.0), "rollout.top_p: must be > 0, got 0.0"),
    (lambda d: d["ot"].update(solver="emd"), "ot.solver: must be one of 'sinkhorn', 'exact', got 'emd'"),
    (lambda d: d["student_server"].update(urls=[1, 2]), "student_server.urls: expected a list of strings"),
    (lambda d: d.update(topd=[1, 2]), "topd: expected a mapping"),
    (lambda d: d["ot"].update(eps=float("nan")), "ot.eps: must be finite"),
    (lambda d: d["topd"].update(false_alarm="low_loss_range", low_loss_probes=0), "topd.low_loss_probes: must be >= 1"),
    (lambda d: d["model"].update(student=""), "model.student: required"),
    (lambda d: d["pipeline"].update(max_staleness=-1), "pipeline.max_staleness: must be >= 0, got -1"),
]


@pytest.mark.parametrize("change,message", MALFORMED, ids=[m[1].split(":")[0] + f"-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_config_gives_one_line_naming_the_key(paths, change, message):
    data = base(paths)
    for section in ("topd", "ot", "pipeline", "student_server"):
        data.setdefault(section, {})
    change(data)
    with pytest.raises(ConfigError) as info:
        load_config(write(paths, data))
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text


def test_invalid_yaml_names_file_and_line(paths):
    p = paths / "bad.yaml"
    p.write_text("train:\n  steps: 3\n bad: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(str(p))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config: file not found: /no/such.yaml"):
        load_config("/no/such.yaml")


def test_bad_override_syntax(paths):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(write(paths, base(paths)), ["topd.window"])


def test_deepspeed_auto_keys_filled_from_yaml(paths):
    cfg = load_config(write(paths, base(paths)), ["train.lr=3e-4", "train.steps=40"])
    ds = resolve_deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 8
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2  # 8 / (2 * 2)
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["params"]["lr"] == 3e-4
    assert "scheduler" not in ds  # the trainer's own schedule (lr_factor) drives the lr
    assert ds["bf16"]["enabled"] is False  # CPU
    assert resolve_deepspeed_config(cfg, world_size=1, on_gpu=True)["bf16"]["enabled"] is True


def test_deepspeed_contradiction_is_an_error(paths):
    ds = json.load(open(paths / "zero3.json"))
    ds["train_micro_batch_size_per_gpu"] = 4
    (paths / "zero3.json").write_text(json.dumps(ds))
    cfg = load_config(write(paths, base(paths)))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu = 4 contradicts train.micro_batch_size = 2"):
        resolve_deepspeed_config(cfg)


def test_deepspeed_world_size_must_divide_and_the_error_names_the_fix(paths):
    """ranks x micro-batch x accumulation != global batch: one line that names the ways out, and each way out
    it names does resolve."""
    import re

    cfg = load_config(write(paths, base(paths)))  # global 8, micro 2
    with pytest.raises(ConfigError) as err:
        resolve_deepspeed_config(cfg, world_size=3)
    msg = str(err.value)
    assert msg.startswith("train.global_batch_size: 8 does not split over 3 rank(s) x train.micro_batch_size 2")
    assert "\n" not in msg and "TRAIN_GPUS" in msg and "docs/DEEPSPEED.md" in msg
    ranks = [int(n) for n in re.search(r"rank count in \[([\d, ]+)\]", msg).group(1).split(",")]
    assert ranks == [1, 2, 4]
    for n in ranks:
        ds = resolve_deepspeed_config(cfg, world_size=n)
        assert n * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == 8
    bigger = int(re.search(r"multiple of 6, e\.g\. (\d+)", msg).group(1))
    assert bigger == 12
    data = base(paths)
    data["train"]["global_batch_size"], data["rollout"]["prompts_per_step"] = bigger, 3
    assert resolve_deepspeed_config(load_config(write(paths, data)), world_size=3)["gradient_accumulation_steps"] == 2


def _shipped(name, prompts_per_step=None, **train):
    from topd_ds.config import config_from_dict

    with open(f"configs/qwen3_30b_a3b_to_4b/{name}.yaml") as f:
        data = yaml.safe_load(f)
    data["train"].update(deepspeed_config="ds_configs/zero3.json", **train)
    if prompts_per_step is not None:
        data["rollout"]["prompts_per_step"] = prompts_per_step
    return config_from_dict(data, check_paths=False)  # the /models and /data paths exist only on the cluster


@pytest.mark.parametrize("name", ["stage1_kd", "opd", "topd"])
def test_shipped_configs_fit_the_gpu_plan(name):
    """The paper-scale configs resolve on the ranks the launch scripts start by default (TRAIN_GPUS of
    scripts/train_single_node.sh: 4 per node), on one node and, stage 2 with prompts_per_step = N, on N
    nodes; every GPU of the node (8 ranks, the old launcher's default) is refused with the fix named."""
    import re

    script = open("scripts/train_single_node.sh").read()
    ranks_per_node = len(re.search(r"TRAIN_GPUS:-([\d,]+)", script).group(1).split(","))
    assert ranks_per_node == 4
    cfg = _shipped(name)
    ds = resolve_deepspeed_config(cfg, world_size=ranks_per_node, on_gpu=True)
    # a sequence-parallel group (stage 1) shares one micro-batch: world / sp data-parallel streams
    streams = ranks_per_node // cfg.train.sequence_parallel_size
    assert streams * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == \
        cfg.train.global_batch_size
    if cfg.train.stage == "opd":
        nodes = 3
        ds = resolve_deepspeed_config(_shipped(name, prompts_per_step=nodes, global_batch_size=4 * nodes),
                                      world_size=ranks_per_node * nodes, on_gpu=True)
        assert ds["train_batch_size"] == 4 * nodes and ds["gradient_accumulation_steps"] == 1
        with pytest.raises(ConfigError, match=r"does not split over 8 rank.*rank count in \[1, 2, 4\]"):
            resolve_deepspeed_config(cfg, world_size=8, on_gpu=True)


def test_deepspeed_invalid_json_and_unknown_stage(paths):
    bad = paths / "bad.json"
    bad.write_text('{"train_batch_size": "auto",\n  oops}')
    with pytest.raises(ConfigError, match=r"bad\.json:2: invalid JSON"):
        load_deepspeed_json(str(bad))
    bad.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match=r"zero_optimization.stage: must be one of 0, 1, 2, 3, got 4"):
        load_deepspeed_json(str(bad))


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_shipped_deepspeed_configs_resolve(paths, name):
    cfg = load_config(write(paths, base(paths)), [f"train.deepspeed_config=ds_configs/{name}"])
    ds = resolve_deepspeed_config(cfg, world_size=1)
    assert "auto" not in json.dumps(ds)


def test_every_field_is_documented():
    rows = describe_config()
    assert len(rows) > 50
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert not undocumented, undocumented


def test_config_reference_doc_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", "scripts/config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open("docs/CONFIG.md") as f:
        assert f.read() == mod.render(), "docs/CONFIG.md is stale: run scripts/config_reference.py"


@pytest.mark.parametrize("name", ["demo/opd.yaml", "demo/topd.yaml", "demo/stage1_kd.yaml",
                                  "qwen3_30b_a3b_to_4b/stage1_kd.yaml", "qwen3_30b_a3b_to_4b/opd.yaml",
                                  "qwen3_30b_a3b_to_4b/topd.yaml"])
def test_shipped_yaml_configs_parse(name):
    import yaml as _yaml

    from topd_ds.config import config_from_dict

    with open(f"configs/{name}") as f:
        cfg = config_from_dict(_yaml.safe_load(f), check_paths=False)
    assert cfg.train.run_name


def test_lr_schedule_warmup_then_decay():
    from topd_ds.config import TrainConfig, lr_factor

    t = TrainConfig(steps=40, warmup_ratio=0.05, lr_decay="linear")
    f = [lr_factor(s, t) for s in range(40)]
    assert f[:3] == [0.5, 1.0, 1.0]  # 2 warm-up steps, none at lr 0
    assert f[-1] == pytest.approx(1 / 38) and all(a >= b for a, b in zip(f[1:], f[2:]))
    assert [lr_factor(s, TrainConfig(steps=10, warmup_ratio=0.0)) for s in (0, 9)] == [1.0, 1.0]
    cos = TrainConfig(steps=21, warmup_ratio=0.05, lr_decay="cosine")
    assert lr_factor(1, cos) == pytest.approx(1.0) and lr_factor(11, cos) == pytest.approx(0.5)


def test_user_deepspeed_scheduler_gets_its_auto_keys(paths):
    ds = json.load(open(paths / "zero3.json"))
    ds["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto",
                                                           "total_num_steps": "auto", "warmup_type": "linear"}}
    (paths / "zero3.json").write_text(json.dumps(ds))
    cfg = load_config(write(paths, base(paths)), ["train.steps=40", "train.lr=1e-4"])
    params = resolve_deepspeed_config(cfg)["scheduler"]["params"]
    assert (params["warmup_max_lr"], params["warmup_num_steps"], params["total_num_steps"]) == (1e-4, 2, 40)
