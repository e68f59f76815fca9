"""Checkpoint integrity (issue 8, promise 3) on a real DeepSpeed ZeRO-3 engine with the tiny student:
a truncated, corrupted or manifest-less newest checkpoint is skipped with a warning for the previous one,
a disk-full error during a save leaves the previous checkpoints intact and no temporary directory, and
`load` restores the weights bit for bit."""

import errno
import json
import os
import re
import shutil

import pytest
import torch

from topd_ds import checkpoint
from topd_ds.comm import distributed as ds
from topd_ds.errors import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ds_config() -> dict:
    """tests/ds_zero3_partitioned.json (ds_configs/zero3.json with every parameter partitioned, see
    test_zero_partitioning.py) with its 'auto' keys filled as resolve_deepspeed_config does (1 rank, CPU)."""
    with open(os.path.join(REPO, "tests", "ds_zero3_partitioned.json")) as f:
        cfg = json.load(f)
    cfg.update(train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
               gradient_clipping=1.0, bf16={"enabled": False})
    cfg["optimizer"]["params"].update(lr=1e-2, weight_decay=0.1)
    return cfg


def _train_step(engine, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 20, (2, 8), generator=g)                 # (B, T) tokens of the char vocabulary
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


def _weights(engine) -> dict:
    return ds.gathered_state_dict(engine.module)


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    """(engine, run_dir): checkpoints step-1 and step-2 written by `checkpoint.save` after one step each."""
    ds.init_distributed()
    engine = ds.build_engine(tiny_models[1], _ds_config())
    run_dir = str(tmp_path_factory.mktemp("ckpt") / "run")
    for step in (1, 2):
        _train_step(engine, step)
        checkpoint.save(engine, run_dir, {"step": step, "nan_steps": 0}, keep=5)
    return engine, run_dir


def _newest_files(run_dir):
    root = os.path.join(run_dir, "checkpoints", "step-00000002")
    files = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n != "manifest.json"]
    return root, files


def _truncate(root, files):
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    return f"{os.path.relpath(biggest, root)} has"


def _flip(root, files):
    path = os.path.join(root, "export", "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return "export/model.safetensors checksum differs from the manifest"


def _no_manifest(root, files):
    os.remove(os.path.join(root, "manifest.json"))
    return "no manifest.json (incomplete write)"


def _missing_file(root, files):
    os.remove(os.path.join(root, "state.json"))
    return "missing state.json"


@pytest.mark.parametrize("damage", [_truncate, _flip, _no_manifest, _missing_file],
                         ids=["truncated", "flipped-byte", "no-manifest", "missing-file"])
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(saved, tmp_path, damage):
    _, src = saved
    run_dir = str(tmp_path / "run")
    shutil.copytree(src, run_dir)
    root, files = _newest_files(run_dir)
    assert checkpoint.find_resume(run_dir, "auto") == root     # intact before the damage
    reason = damage(root, files)
    with pytest.warns(UserWarning, match=re.escape(f"skipping checkpoint {root}: {reason}")):
        found = checkpoint.find_resume(run_dir, "auto")
    assert found == os.path.join(run_dir, "checkpoints", "step-00000001")
    with pytest.raises(CheckpointError, match=re.escape(f"--resume {root}: {reason}")):
        checkpoint.find_resume(run_dir, root)                  # named explicitly: an error, not a fallback


def test_no_intact_checkpoint_starts_fresh(saved, tmp_path):
    _, src = saved
    run_dir = str(tmp_path / "run")
    shutil.copytree(src, run_dir)
    for path in checkpoint.list_checkpoints(run_dir):
        os.remove(os.path.join(path, "manifest.json"))
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert checkpoint.find_resume(run_dir, "auto") is None
    assert checkpoint.find_resume(run_dir, "none") is None


def _manifest(ckpt_dir):
    with open(os.path.join(ckpt_dir, "manifest.json")) as f:
        return json.load(f)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["torch.save", "write_manifest"])
def test_disk_full_during_save_keeps_the_previous_checkpoints(saved, monkeypatch, where):
    """ENOSPC in DeepSpeed's first shard write (torch.save) or at the very end (the manifest)."""
    engine, run_dir = saved
    before = checkpoint.list_checkpoints(run_dir)
    sums = {p: _manifest(p) for p in before}
    if where == "torch.save":
        monkeypatch.setattr(torch, "save", _enospc)
    else:
        monkeypatch.setattr(checkpoint, "write_manifest", _enospc)
    with pytest.raises(OSError) as err:
        checkpoint.save(engine, run_dir, {"step": 3, "nan_steps": 0}, keep=5)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert checkpoint.list_checkpoints(run_dir) == before
    assert [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith(".tmp-")] == []
    for path in before:
        assert checkpoint.verify(path) is None
        assert _manifest(path) == sums[path]
    assert checkpoint.find_resume(run_dir, "auto") == before[-1]


def test_load_restores_the_weights_exactly(saved, tiny_models):
    engine, run_dir = saved
    newest = checkpoint.find_resume(run_dir, "auto")
    at_save = _weights(engine)                                   # the engine has not moved since step-2
    _train_step(engine, 99)
    moved = _weights(engine)
    assert any(not torch.equal(moved[k], at_save[k]) for k in at_save)
    state = checkpoint.load(engine, newest)
    assert state["step"] == 2 and state["_dir"] == newest
    restored = _weights(engine)
    assert restored.keys() == at_save.keys()
    for k in at_save:
        assert torch.equal(restored[k], at_save[k]), k
    # a fresh engine resumes the same weights and optimizer: one more identical step agrees bit for bit
    fresh = ds.build_engine(tiny_models[1], _ds_config())
    checkpoint.load(fresh, newest)
    _train_step(engine, 7)
    _train_step(fresh, 7)
    a, b = _weights(engine), _weights(fresh)
    for k in a:
        assert torch.equal(a[k], b[k]), k
