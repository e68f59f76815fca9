"""Resident memory, threads and child processes of a process, read from Linux's /proc (no psutil).

    usage()                 # this process, for the trainer's per-step log: mem/rss_mb, sys/threads, ...
    status(pid)             # {"rss_mb": ..., "threads": ...} of any process, None once it is gone
    children(pid)           # pids whose parent is `pid`
    cmdline(pid)            # its command line, "" once it is gone
    alive(pid)              # running (not gone, not a zombie)

The trainer logs `usage()` every step, so a leak (memory, threads, server processes) shows as a slope in
TensorBoard; scripts/soak.py and the reliability tests read the same numbers. Off Linux every number is
absent (empty dict / None), never an error.
"""

import os
import threading

PROC = "/proc"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process is gone (or this is not Linux)
        return None


def status(pid: int | str = "self") -> dict | None:
    """Current resident set size (VmRSS, MiB) and kernel thread count of `pid`; None if it does not exist.
    A zombie has no VmRSS line: its rss_mb is 0."""
    text = _read(os.path.join(PROC, str(pid), "status"))
    if text is None:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0]) if "VmRSS" in fields else 0
    return {"rss_mb": rss_kb / 1024, "threads": int(fields["Threads"])}


def _stat_fields(pid: int | str) -> list | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]; the name may hold spaces or
    parentheses, so it is cut at the last ')'."""
    text = _read(os.path.join(PROC, str(pid), "stat"))
    if text is None:
        return None
    return text[text.rindex(")") + 2:].split()


def cmdline(pid: int) -> str:
    """The command line of `pid`, its arguments joined by spaces; "" once it is gone."""
    text = _read(os.path.join(PROC, str(pid), "cmdline"))
    return "" if text is None else text.replace("\0", " ").strip()


def alive(pid: int) -> bool:
    """True while `pid` runs; False once it exited (gone, or a zombie nobody reaped yet)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children(pid: int | str = "self") -> list:
    """Pids of the live processes whose parent is `pid` (one scan of /proc)."""
    pid = os.getpid() if pid == "self" else int(pid)
    out = []
    for name in os.listdir(PROC) if os.path.isdir(PROC) else []:
        if name.isdigit():
            fields = _stat_fields(name)
            if fields is not None and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out.append(int(name))
    return sorted(out)


def usage() -> dict:
    """This process's numbers for the per-step log (empty off Linux):

    mem/rss_mb           resident memory now (the log's mem/peak_rss_mb is the high-water mark)
    sys/threads          kernel threads (torch's OpenMP pool, the pipeline's loop, aiohttp, tqdm, ...)
    sys/py_threads       Python threads (threading.active_count)
    sys/children         live child processes (the launched servers)
    mem/children_rss_mb  their resident memory, summed
    """
    me = status()
    if me is None:
        return {}
    kids = [s for s in (status(p) for p in children()) if s is not None]
    return {"mem/rss_mb": me["rss_mb"], "sys/threads": me["threads"], "sys/py_threads": threading.active_count(),
            "sys/children": len(kids), "mem/children_rss_mb": sum(s["rss_mb"] for s in kids)}
