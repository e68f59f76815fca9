"""atomic_dir: a directory is replaced whole or not at all."""

import os

import pytest

from topd_ds.fsutil import atomic_dir


def test_success_replaces_and_failure_keeps_the_old(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "a"), "w").write("1")
    assert os.listdir(target) == ["a"]
    with atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "b"), "w").write("2")
    assert os.listdir(target) == ["b"]  # replaced whole, not merged
    with pytest.raises(OSError):
        with atomic_dir(str(target)) as tmp:
            open(os.path.join(tmp, "c"), "w").write("3")
            raise OSError(28, "No space left on device")
    assert os.listdir(target) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp dirs left behind
