"""Issue 24 finding 7: scripts/train_multi_node.sh with several hosts. pdsh starts every rank in a fresh ssh
environment and DeepSpeed 0.19.8's runner forwards only NCCL*/PYTHON*/MLFLOW*/MV2*/UCX* and the lines of its
`.deepspeed_env` file (launcher/runner.py:36-38, 598-611), so the script writes this run's variables to such a
file and points DS_ENV_FILE at it; and MASTER_ADDR must be the hostfile's first host. The launcher is replaced
by a stub (DEEPSPEED=...) that records its arguments and the file DeepSpeed's runner would read; the file is
then parsed the way the runner parses it."""

import os
import stat
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "train_multi_node.sh")


def _run(tmp_path, master, **env):
    (tmp_path / "hostfile").write_text("node-a slots=8\n# a comment\nnode-b slots=8\n")
    stub = tmp_path / "deepspeed"
    stub.write_text('#!/usr/bin/env bash\necho "$@" > "$STUB_OUT/args"\n'
                    'cp "$DS_ENV_FILE" "$STUB_OUT/env"; stat -c %a "$DS_ENV_FILE" > "$STUB_OUT/mode"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TOPD_", "HF_", "DS_ENV_FILE"))}
    run_env = {**base, "HOSTFILE": str(tmp_path / "hostfile"), "MASTER_ADDR": master, "DEEPSPEED": str(stub),
               "STUB_OUT": str(tmp_path), "TMPDIR": str(tmp_path), "HOME": str(tmp_path), **env}
    return subprocess.run(["bash", SCRIPT, "cfg.yaml", "train.steps=3"], cwd=tmp_path, env=run_env,
                          capture_output=True, text=True, timeout=60)


def _runner_exports(path):
    """What deepspeed/launcher/runner.py:604-611 makes of the file: key, val = line.split('=', 1)."""
    out = {}
    for line in open(path).readlines():
        key, val = line.split("=", maxsplit=1)
        out[key.strip()] = val.strip()
    return out


def test_the_nodes_get_the_api_key_and_hf_variables(tmp_path):
    (tmp_path / ".deepspeed_env").write_text("MY_SETTING=1\n")   # the user's own file is kept
    out = _run(tmp_path, "node-a", TOPD_API_KEY="k-123_abc", HF_HOME="/shared/hf cache", HF_HUB_OFFLINE="1",
               FORWARD_ENV="MY_EXTRA", MY_EXTRA="x", CUDA_VISIBLE_DEVICES="0")
    assert out.returncode == 0, out.stderr
    exports = _runner_exports(tmp_path / "env")
    assert exports["TOPD_API_KEY"] == "k-123_abc" and exports["HF_HOME"] == "/shared/hf cache"
    assert exports["HF_HUB_OFFLINE"] == "1" and exports["MY_EXTRA"] == "x" and exports["MY_SETTING"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in exports            # the launcher sets it per rank
    assert (tmp_path / "mode").read_text().strip() == "600"  # it holds the API key
    assert not [f for f in os.listdir(tmp_path) if f.startswith("topd-ds-env.")]   # removed at exit
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("--master_addr") + 1] == "node-a" and "node-a:4,5,6,7@node-b:4,5,6,7" in args


def test_master_addr_other_than_the_first_host_stops_with_one_line(tmp_path):
    out = _run(tmp_path, "node-b", TOPD_API_KEY="k")
    assert out.returncode == 2 and not (tmp_path / "args").exists()
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "MASTER_ADDR=node-b is not" in lines[0] and "first host node-a" in lines[0], out.stderr


def test_a_value_the_remote_shell_would_expand_stops_with_one_line(tmp_path):
    out = _run(tmp_path, "node-a", TOPD_API_KEY="abc$HOME")
    assert out.returncode == 2 and not (tmp_path / "args").exists()
    assert out.stderr.strip().splitlines() == [
        f"{SCRIPT}: TOPD_API_KEY holds a character ($ ` \" \\ or a newline) that the nodes' shell would expand; "
        f"pdsh cannot pass it"], out.stderr
