"""Bad input (issue 8, promise 5): each case gives one exact line, and none leaves files behind.

This file holds the cases not tested elsewhere; docs/RELIABILITY.md lists all of them with the others:
tests/test_config.py (unknown key, wrong type, out of range, missing files, invalid YAML / JSON, unknown ZeRO
stage, micro-batch contradiction), tests/test_data.py (invalid JSON with its line, missing field, empty prompt,
too long, non-UTF-8, empty file) and tests/test_engines_client.py (server answers: missing fields, length
mismatch, NaN logprobs, hidden-state width).
"""

import json
import os
import shutil
import types

import pytest
import yaml

from topd_ds import cli
from topd_ds.config import load_config, resolve_deepspeed_config
from topd_ds.errors import CheckpointError, ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base(tmp_path, tiny_models) -> dict:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+2="}\n{"prompt": "3*4="}\n')
    return {
        "model": {"teacher": tiny_models[0], "student": tiny_models[1]},
        "data": {"prompts": str(tmp_path / "prompts.jsonl"), "max_prompt_tokens": 8},
        "rollout": {"n_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 16},  # fits the 256 positions
        "train": {"deepspeed_config": str(tmp_path / "zero3.json"), "global_batch_size": 4, "micro_batch_size": 2,
                  "out_dir": str(tmp_path / "runs"), "run_name": "bad"},
    }


def write(tmp_path, data, *, ds_change=None) -> str:
    with open(os.path.join(REPO, "ds_configs", "zero3.json")) as f:
        ds = json.load(f)
    if ds_change:
        ds_change(ds)
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return str(path)


def _no_outputs(tmp_path):
    assert not (tmp_path / "runs").exists()


PLAIN = "train.run_name: must be a plain directory name (no '/', not '.' or '..')"


# ---- configs and overrides ------------------------------------------------------------------------------------
CONFIG = [
    (lambda d: d["model"].update(teacher="/no/teacher"), [], "model.teacher: directory not found: /no/teacher"),
    (lambda d: d["data"].update(eval="/no/eval.jsonl"), [], "data.eval: file not found: /no/eval.jsonl"),
    (None, ["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
    (None, ["train.max_nan_steps=0"], "train.max_nan_steps: must be >= 1, got 0"),
    (None, ["train.keep_checkpoints=0"], "train.keep_checkpoints: must be >= 1, got 0"),
    # outputs go to out_dir/run_name only: a run name cannot climb out of out_dir
    (None, ["train.run_name=../elsewhere"], f"{PLAIN}, got '../elsewhere'"),
    (None, ["train.run_name=a/b"], f"{PLAIN}, got 'a/b'"),
    (None, ["train.run_name=.."], f"{PLAIN}, got '..'"),
    (None, ["data.rows=1-2"], "data.rows: expected start:stop (e.g. 20000:30000), got '1-2'"),
    (None, ["data.on_long_prompt=drop"], "data.on_long_prompt: must be one of 'skip', 'error', got 'drop'"),
    (lambda d: d["data"].update(fields={"promt": "x"}), [],
     "data.fields.promt: unknown role (known: prompt, messages, response, solution, answer)"),
    (lambda d: d["data"].update(fields=["prompt"]), [], "data.fields: expected a mapping of names to names, got ['prompt']"),
]


@pytest.mark.parametrize("change,overrides,message", CONFIG,
                         ids=[c[2].split(":")[0] + f"-{i}" for i, c in enumerate(CONFIG)])
def test_config_errors(tmp_path, tiny_models, change, overrides, message):
    data = base(tmp_path, tiny_models)
    if change:
        change(data)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data), overrides)
    assert str(err.value) == message


def test_unknown_override_key_lists_the_known_ones(tmp_path, tiny_models):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, base(tmp_path, tiny_models)), ["train.stpes=3"])
    assert str(err.value).startswith("train.stpes: unknown key (known: stage, deepspeed_config, steps, lr,")
    assert "\n" not in str(err.value)


def test_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: expected a mapping at the top level"


# ---- the ZeRO JSON against the YAML ----------------------------------------------------------------------------
AUTO = '(set it to "auto" or make them agree)'
ZERO = [
    (lambda ds: ds.update(train_batch_size=16), [],
     f"train_batch_size = 16 contradicts train.global_batch_size = 4 {AUTO}"),
    (lambda ds: ds.update(gradient_accumulation_steps=3), [],
     "gradient_accumulation_steps = 3 contradicts train.global_batch_size / "
     "(micro_batch_size * world_size / sequence_parallel_size) = 2 " + AUTO),
    (lambda ds: ds.update(gradient_clipping=5.0), [],
     f"gradient_clipping = 5.0 contradicts train.grad_clip = 1.0 {AUTO}"),
    (lambda ds: ds.update(fp16={"enabled": True}), [], "fp16.enabled: fp16 is not supported (use bf16)"),
    (lambda ds: ds.update(bf16={"enabled": False}), ["model.dtype=bfloat16"],
     "bf16.enabled = False contradicts model.dtype = bfloat16"),
    (lambda ds: ds["zero_optimization"].update(stage3_prefetch_bucket_size="auto"), [],
     ("zero_optimization.stage3_prefetch_bucket_size: 'auto' needs the model's hidden size; set a number "
      "(see docs/DEEPSPEED.md)")),
    (lambda ds: ds["zero_optimization"].update(stage="three"), [],
     "zero_optimization.stage: must be one of 0, 1, 2, 3, got 'three'"),
]


@pytest.mark.parametrize("ds_change,overrides,message", ZERO, ids=[f"zero-{i}" for i in range(len(ZERO))])
def test_zero_json_errors_name_the_file_and_key(tmp_path, tiny_models, ds_change, overrides, message):
    path = write(tmp_path, base(tmp_path, tiny_models), ds_change=ds_change)
    with pytest.raises(ConfigError) as err:
        resolve_deepspeed_config(load_config(path, overrides))
    assert str(err.value) == f"{tmp_path / 'zero3.json'}: {message}"


# ---- tokenizers: teacher and student must share one vocabulary ------------------------------------------------
def test_tokenizer_mismatch_between_teacher_and_student(tmp_path, tiny_models):
    from topd_ds.tasks.chartok import build_char_tokenizer
    from topd_ds.data.tokenizers import load_tokenizers

    teacher = str(tmp_path / "teacher")
    shutil.copytree(tiny_models[0], teacher)
    build_char_tokenizer("0123456789+-").save_pretrained(teacher)   # 16 tokens instead of 20
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(student=tiny_models[1], teacher=teacher))
    with pytest.raises(ConfigError) as err:
        load_tokenizers(cfg)
    assert str(err.value) == ("model.teacher: tokenizer differs from model.student's (16 vs 20 tokens); "
                              "OPD needs one shared vocabulary")


def test_student_tokenizer_without_eos(tmp_path, tiny_models, char_tokenizer):
    from topd_ds.train import load_tokenizers

    student = str(tmp_path / "student")
    shutil.copytree(tiny_models[1], student)
    cfg_path = os.path.join(student, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg["eos_token"] = None
    with open(cfg_path, "w") as f:
        json.dump(tok_cfg, f)
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(student=student, teacher=tiny_models[0]))
    with pytest.raises(ConfigError) as err:
        load_tokenizers(cfg)
    assert str(err.value) == f"model.student: tokenizer has no eos token ({student})"


# ---- through the trainer: errors before any server, engine or output directory ---------------------------------
@pytest.fixture()
def no_work(monkeypatch):
    """Fail the test if the trainer builds an engine or launches a server."""
    import topd_ds.comm.distributed
    import topd_ds.engines.launch

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the input was checked")
    monkeypatch.setattr(topd_ds.comm.distributed, "build_engine", forbidden)
    monkeypatch.setattr(topd_ds.engines.launch, "launch_server", forbidden)


DATA = [
    (b'{"prompt": "1+2+3+4+5+6="}\n', {"on_long_prompt": "error"}, ":1: prompt has 13 tokens, more than max_prompt_tokens=8"),
    (b'{"prompt": "1+2+3+4+5+6="}\n', {}, ": all 1 prompts are longer than max_prompt_tokens=8"),
    (b'{"prompt": "1+2="}\n{"prompt": "\xff"}\n', {}, ":2: not valid UTF-8 (byte 12)"),
    (b"", {}, ": no examples (empty file)"),
    (b'{"question": "1+2="}\n{"messages": [{"role": "user"}]}\n', {},
     ":2: field 'messages[0]'.content must be a string, got NoneType"),
    (b'{"question": "1+2="}\n', {"check_rows": 1, "fields": {"prompt": "q"}}, ":1: missing field 'q' (data.fields.prompt)"),
]


@pytest.mark.parametrize("content,data_keys,message", DATA,
                         ids=["too-long-error", "too-long-all-skipped", "not-utf8", "empty", "bad-message", "mapped"])
def test_trainer_rejects_bad_prompts_before_any_work(tmp_path, tiny_models, no_work, content, data_keys, message):
    from topd_ds.train import main

    data = base(tmp_path, tiny_models)
    data["data"].update(data_keys)
    (tmp_path / "prompts.jsonl").write_bytes(content)
    path = write(tmp_path, data)
    with pytest.raises(DataError) as err:
        main(["--config", path])
    assert str(err.value) == str(tmp_path / "prompts.jsonl") + message
    _no_outputs(tmp_path)


def test_trainer_rejects_a_system_prompt_without_a_chat_template(tmp_path, tiny_models, no_work):
    from topd_ds.train import main

    path = write(tmp_path, base(tmp_path, tiny_models))
    with pytest.raises(ConfigError) as err:
        main(["--config", path, "data.system_prompt=Be brief."])
    assert str(err.value) == "data.system_prompt: needs a chat template, and data.chat_template=auto gives plain text"
    _no_outputs(tmp_path)


def test_trainer_rejects_a_resume_dir_that_is_not_a_checkpoint(tmp_path, tiny_models, no_work):
    from topd_ds.train import main

    path = write(tmp_path, base(tmp_path, tiny_models))
    with pytest.raises(CheckpointError) as err:
        main(["--config", path, "--resume", str(tmp_path / "nope")])
    assert str(err.value) == f"--resume {tmp_path / 'nope'}: not a directory"
    _no_outputs(tmp_path)


# ---- the command line ------------------------------------------------------------------------------------------
def test_cli_unknown_command(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == ("topd-ds: unknown command 'trian'; choose one of: "
                                               + ", ".join(cli.COMMANDS))


def test_cli_train_without_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "topd-ds train: error: the following arguments are required: --config"


def test_cli_train_with_a_missing_config_file(tmp_path, capsys, no_work):
    missing = str(tmp_path / "missing.yaml")
    assert cli.main(["train", "--config", missing]) == 1
    assert capsys.readouterr().err.strip() == f"topd-ds train: error: --config: file not found: {missing}"


def test_cli_config_error_is_one_line_and_writes_nothing(tmp_path, tiny_models, capsys, no_work):
    data = base(tmp_path, tiny_models)
    data["topd"] = {"windw": 5}
    assert cli.main(["train", "--config", write(tmp_path, data)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("topd-ds train: error: topd.windw: unknown key (known: ") and "\n" not in err
    _no_outputs(tmp_path)
