"""Command line entry point: `topd-ds <command> [args]`.

Each command lives in its own module with a `main(argv)`; this file only dispatches, so
`topd-ds --help` stays fast (no torch import) and each module reads top to bottom.
"""

import importlib
import sys

COMMANDS = {
    "train": ("topd_ds.train", "run stage 1 (KD) or stage 2 (OPD/TOPD) from a YAML config"),
    "serve": ("topd_ds.engines.server", "serve a transformers model over SGLang's native HTTP API"),
    "sample": ("topd_ds.stage1.sample", "stage 1: sample the teacher's responses into data.responses (resumable)"),
    "check": ("topd_ds.preflight", "before a run: config, data, servers, batch, lengths, weight route, memory"),
    "make-models": ("topd_ds.tasks.make_models", "build the arith task data, tokenizer, teacher and student"),
    "make-data": ("topd_ds.tasks.arith", "write arith prompts/solutions as JSONL"),
    "eval": ("topd_ds.evaluate", "pass@1 over n samples through an inference server"),
    "probe": ("topd_ds.studies.probe", "token loss vs near-future OT divergence (paper Sec 2.1)"),
    "filter-study": ("topd_ds.studies.filter_study", "precision / recall of the D_OT false-alarm filter against a task's checker"),
    "local-correction": ("topd_ds.studies.local_correction", "D_OT before/after M local OPD vs TOPD updates (Sec 5.2)"),
}


def usage() -> str:
    lines = ["usage: topd-ds <command> [args]", "", "commands:"]
    lines += [f"  {name:<18}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"topd-ds: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    from topd_ds.errors import TopdError
    from topd_ds.interrupt import Interrupted

    try:
        return module.main(rest) or 0
    except TopdError as err:  # one clear line, no traceback, for the errors we raise on purpose
        print(f"topd-ds {name}: error: {err}", file=sys.stderr)
        return 1
    except Interrupted as stop:  # train's loop stopped at a step boundary (topd_ds/interrupt.py), checkpoint saved
        print(f"topd-ds {name}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C: the `finally` blocks have run (launched servers stopped, temp dirs removed)
        print(f"\ntopd-ds {name}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
