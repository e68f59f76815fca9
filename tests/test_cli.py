"""The command line: every listed command imports and has a main; misuse is one line and exit code 2."""

import importlib
import subprocess
import sys

from topd_ds.cli import COMMANDS, main


def test_every_command_has_a_main():
    for name, (module, _) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), "main")), name


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("topd-ds: unknown command 'trian'; choose one of: train, serve")
    assert "\n" not in err


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_topd_error_is_one_line_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "topd_ds.cli", "train", "--config", str(tmp_path / "no.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"topd-ds train: error: --config: file not found: {tmp_path / 'no.yaml'}"
    assert "Traceback" not in out.stderr
