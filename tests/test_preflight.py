"""`topd-ds check` (topd_ds/preflight.py) and the length check of load_config (issue 24).

* the memory arithmetic against the numbers docs/SCALING.md states at the paper's shapes;
* the new user's stage-1 config (rollout.max_new_tokens left at 8000, a 128-position student, an eval set):
  load_config stops on it in one line, where the old code started and restarted the server three times
  (tests/test_invalid_request.py has the restarts);
* the whole check against built-in servers over real HTTP: OK on a good config; on a bad one exactly one line
  per problem (batch split, a length past the SERVER's positions, an unreachable URL) and exit 1;
* SGLang's launch flags read from /get_server_info facts (hidden states, dp with an in-memory weight route).
"""

import os

import pytest
import yaml

from topd_ds.errors import ConfigError
from topd_ds.preflight import Report, check_server_flags, check_weight_route
from topd_ds.shapes import ModelShape, memory_per_rank, param_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
# Qwen3-4B, docs/SCALING.md's header: hidden 2560, 36 layers, MLP 9728, vocabulary 151,936, ~4.0 B parameters
QWEN3_4B = ModelShape(n_params=4.02e9, hidden=2560, layers=36, intermediate=9728, vocab=151_936, positions=262_144)


def test_memory_per_rank_matches_scaling_md():
    """The projections docs/SCALING.md section 1 writes down, each within 1 GB."""
    topd = dict(tokens=17_100, chunk_size=1024, dense_mask_tokens=17_100, teacher_hidden_tokens=9_700,
                teacher_hidden_size=2048)
    assert memory_per_rank(QWEN3_4B, ranks=4, **topd)["total"] / GB == pytest.approx(31, abs=1)   # "~31 GB"
    assert memory_per_rank(QWEN3_4B, ranks=2, **topd)["total"] / GB == pytest.approx(47, abs=1)   # "N = 2 (47 GB)"
    m = memory_per_rank(QWEN3_4B, ranks=4, **topd)
    assert m["model states"] / GB == pytest.approx(16, abs=0.2) and m["activations"] / GB == pytest.approx(3.1, abs=0.1)
    assert m["one layer"] / GB == pytest.approx(1.5, abs=0.1)
    assert m["attention mask"] / GB == pytest.approx(0.9, abs=0.05)
    assert m["loss chunk"] / GB == pytest.approx(5.0, abs=0.1) and m["lm_head"] / GB == pytest.approx(2.3, abs=0.1)
    local = memory_per_rank(QWEN3_4B, ranks=4, tokens=17_100, chunk_size=1024, dense_mask_tokens=17_100,
                            teacher_params=30.5e9)
    assert local["teacher shard"] / GB == pytest.approx(15, abs=0.3)                            # "~15 GB"
    stage1 = memory_per_rank(QWEN3_4B, ranks=4, tokens=16_384, chunk_size=1024)
    assert stage1["total"] / GB == pytest.approx(30, abs=1)                                      # "~30 GB"
    sp_row_mask = memory_per_rank(QWEN3_4B, ranks=4, tokens=17_000, chunk_size=1024, dense_mask_tokens=34_000)
    assert sp_row_mask["attention mask"] / GB == pytest.approx(3.5, abs=0.1)    # the old SP core's 1.2 + 2.3 GB


def test_param_count_reads_safetensors_headers(tiny_models):
    from transformers import AutoModelForCausalLM

    for d in tiny_models:
        model = AutoModelForCausalLM.from_pretrained(d)
        want = sum(p.numel() for p in model.parameters())   # a tied weight once, as save_pretrained stores it
        assert param_count(d) == want, (d, param_count(d), want)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from topd_ds.tasks.arith import make_splits, write_jsonl

    root = tmp_path_factory.mktemp("preflight")
    train, test = make_splits(30, 10, seed=5, depth=2)
    write_jsonl(str(root / "train.jsonl"), train)
    write_jsonl(str(root / "eval.jsonl"), test)
    return root


@pytest.fixture(scope="module")
def short_student(tmp_path_factory, char_tokenizer):
    """A 1-layer Qwen3 student with 128 positions (the new user's model)."""
    from topd_ds.tasks.models import build_model, save_model

    model = build_model("qwen3", seed=3, hidden=32, layers=1, heads=4, vocab_size=len(char_tokenizer),
                        pad_id=char_tokenizer.pad_token_id, bos_id=char_tokenizer.bos_token_id,
                        eos_id=char_tokenizer.eos_token_id, max_positions=128)
    return save_model(model, str(tmp_path_factory.mktemp("short") / "student"), char_tokenizer)


def write_config(root, name, **sections):
    cfg = {"data": {"prompts": str(root / "train.jsonl"), "max_prompt_tokens": 64},
           "train": {"deepspeed_config": os.path.join(REPO, "ds_configs/zero3.json"), "out_dir": str(root / "runs"),
                     "run_name": name}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_new_users_stage1_config_stops_at_load(data, short_student, tiny_models):
    """Stage 1 with an eval set and rollout.max_new_tokens at its 8000 default on a 128-position student: one
    ConfigError naming the key and the limit, before any server or model (the old code started the run)."""
    from topd_ds.config import load_config

    path = write_config(data, "newuser", model={"student": short_student, "teacher": tiny_models[0]},
                        data={"eval": str(data / "eval.jsonl")}, kd={"max_new_tokens": 24, "source": "teacher"},
                        train={"stage": "kd", "global_batch_size": 4, "steps": 2})
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens: 1 prompt token\(s\) \+ 8000 new = 8001 > the "
                                          r"student's 128 positions .*set rollout.max_new_tokens to at most 127"):
        load_config(path)
    assert load_config(path, ["rollout.max_new_tokens=64"]).rollout.max_new_tokens == 64


def test_check_against_built_in_servers(data, short_student, tiny_models, capsys):
    """Real HTTP: the student role's URL serves the 128-position model while model.student names a 256-position
    one, so only the server's own limit (/model_info max_positions) can find the length problem."""
    from topd_ds.engines.launch import free_port, launch_server
    from topd_ds.preflight import main

    with launch_server(short_student) as server:
        good = write_config(data, "good", model={"student": tiny_models[1], "teacher": tiny_models[0]},
                            student_server={"urls": [server.url]}, teacher_server={"urls": [server.url]},
                            rollout={"max_new_tokens": 32, "n_per_prompt": 2, "prompts_per_step": 2},
                            train={"stage": "opd", "global_batch_size": 4})
        assert main(["--config", good, "--world-size", "2"]) == 0
        out = capsys.readouterr().out
        assert "topd-ds check: OK" in out and "error:" not in out, out
        assert f"student server {server.url}: built-in, 128 positions" in out, out
        assert "ok: batch: 2 rank(s) x micro-batch 1 x accumulation 2 = global batch 4" in out, out

        dead = f"http://127.0.0.1:{free_port()}"
        bad = write_config(data, "bad", model={"student": tiny_models[1], "teacher": tiny_models[0]},
                           student_server={"urls": [server.url]}, teacher_server={"urls": [dead]},
                           rollout={"max_new_tokens": 120, "n_per_prompt": 2, "prompts_per_step": 2},
                           train={"stage": "opd", "global_batch_size": 4})
        assert main(["--config", bad, "--world-size", "3"]) == 1
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, out
    assert "does not split over 3 rank(s)" in errors[0], errors
    assert any(f"teacher_server.urls: {dead}: not reachable" in e for e in errors), errors
    assert any("new = " in e and f"> the student's 128 positions (context length of {server.url})" in e
               for e in errors), errors
    assert out.rstrip().endswith(f"topd-ds check: 3 problem(s) in {bad}"), out


def test_cli_lists_check():
    from topd_ds.cli import COMMANDS

    assert COMMANDS["check"][0] == "topd_ds.preflight"


def _cfg(**sections):
    from topd_ds.config import config_from_dict

    base = {"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return config_from_dict(base, check_paths=False)


def test_sglang_flags_from_server_info():
    """Facts as SGLang 0.5.23's /get_server_info gives them: a teacher without hidden states when the losses
    need them is an error; a missing deterministic flag and a chunked prefill are notes; a dp-2 student under an
    in-memory weight route is an error (weight_sync.route_problems, called by the check)."""
    cfg = _cfg(train={"weight_sync": "tensor"})
    info = {"kind": "sglang", "version": "0.5.23", "tp_size": 1, "dp_size": 2, "chunked_prefill_size": 8192,
            "enable_return_hidden_states": False, "enable_deterministic_inference": False, "context_length": 40960}
    report = Report()
    check_server_flags(cfg, "teacher", [("http://t:1", info)], report)
    check_server_flags(cfg, "student", [("http://s:1", info)], report)
    assert len(report.errors) == 1 and "--enable-return-hidden-states" in report.errors[0], report.errors
    assert any("--chunked-prefill-size 8192" in n for n in report.notes)
    assert sum("--enable-deterministic-inference" in n for n in report.notes) == 2
    route = Report()
    check_weight_route(cfg, QWEN3_4B, [("http://s:1", info)], route)
    assert any("http://s:1 runs --dp-size 2" in e for e in route.errors), route.errors
    disk = Report()
    check_weight_route(_cfg(), QWEN3_4B, [("http://s:1", info)], disk)
    assert disk.errors == [] and disk.oks[0].startswith("weight route: disk through "), disk.oks
    ok = Report()
    check_server_flags(_cfg(teacher={"scoring": "local"}), "teacher",
                       [("http://t:1", {**info, "dp_size": 1})], ok)
    assert ok.errors == [], ok.errors
