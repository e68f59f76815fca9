"""Rank 0's servers for a run: built-in ones launched for roles without URLs (registered with the supervisor,
which restarts them), and the factory of the pipeline's clients."""

import os
import time

from topd_ds.comm.distributed import print0
from topd_ds.engines.supervisor import Supervisor


def make_clients_factory(cfg, student_url, teacher_url, *, teacher_hidden_size: int | None = None,
                         supervisor: Supervisor | None = None):
    """The pipeline's client maker; the teacher's hidden states are checked to be `teacher_hidden_size` wide.
    With a supervisor, the clients are guarded (their ServerErrors name the server, for `recover`)."""
    from topd_ds.engines.sglang import SGLangClient

    def client(server_cfg, urls, hidden_size=None):
        return SGLangClient(urls, api_key=server_cfg.api_key or os.environ.get("TOPD_API_KEY"),
                            timeout_s=server_cfg.timeout_s, max_retries=server_cfg.max_retries,
                            max_concurrency=server_cfg.max_concurrency, router=server_cfg.router,
                            hidden_size=hidden_size)

    async def make():
        student = client(cfg.student_server, student_url)
        teacher = client(cfg.teacher_server, teacher_url, teacher_hidden_size)
        if supervisor is None:
            return student, teacher
        return supervisor.guard(student, "student"), supervisor.guard(teacher, "teacher")
    return make


def start_servers(cfg, student_weights: str, supervisor: Supervisor, *, student_version: str | None = None):
    """URLs of the student and teacher servers; built-in servers are launched for roles without URLs. Every
    role is registered with `supervisor`, which restarts the launched ones and stops them on exit."""
    from topd_ds.engines.launch import launch_server

    urls = {}
    for role, server_cfg, model_dir, version in (("student", cfg.student_server, student_weights, student_version),
                                                  ("teacher", cfg.teacher_server, cfg.model.teacher, None)):
        api_key = server_cfg.api_key or os.environ.get("TOPD_API_KEY")
        if server_cfg.urls:
            urls[role] = list(server_cfg.urls)
            supervisor.external(role, urls[role], max_restarts=server_cfg.max_restarts,
                                health_wait_s=server_cfg.timeout_s, api_key=api_key)
            continue

        def launch(weights, port=None, version=None, server_cfg=server_cfg):
            # batch_window_ms=0: each request is its own batch, so an answer never depends on which other
            # requests happened to arrive with it (padding changes the last bits): the same seed, the same run
            return launch_server(weights, port=port, device=server_cfg.device, api_key=server_cfg.api_key,
                                 batch_window_ms=0, weight_version=version)
        t0 = time.perf_counter()
        proc = launch(model_dir, version=version)
        supervisor.launched(role, proc, launch=launch, weights=model_dir, version=version,
                            max_restarts=server_cfg.max_restarts)
        urls[role] = [proc.url]
        print0(f"started built-in {role} server at {proc.url} (pid {proc.proc.pid}, "
               f"{time.perf_counter() - t0:.1f}s)")
    return urls["student"], urls["teacher"]
