"""Test hook (test_launch.py): SIGKILL a launcher's whole process group right after a checkpoint completes.

Put this folder on PYTHONPATH and set TOPD_TEST_KILL_AFTER_CHECKPOINT=K: in every Python process of the run,
`topd_ds.checkpoint.save` is wrapped so that rank 0, once the step-K checkpoint is complete on every rank
(save's closing barrier has passed), sends SIGKILL to its process group: the launcher and all ranks die at
the same instant, with no cleanup, as on a lost node. Polling the run dir from outside instead races with
the next steps on a loaded machine. Without the variable this file does nothing.
"""

import os

_STEP = os.environ.get("TOPD_TEST_KILL_AFTER_CHECKPOINT")
if _STEP:
    import signal

    from topd_ds import checkpoint
    from topd_ds.comm import distributed

    _save = checkpoint.save

    def save(engine, run_dir, state, *args, **kwargs):
        final = _save(engine, run_dir, state, *args, **kwargs)
        if state["step"] == int(_STEP) and distributed.rank() == 0:
            os.killpg(0, signal.SIGKILL)
        return final

    checkpoint.save = save
