"""Issue 24 finding 8: SGLang's /health runs a one-token generation and can take 1-20 s on a busy server
(SGLANG_HEALTH_CHECK_TIMEOUT, default 20 s). A slow but healthy server must count as healthy, both for
`wait_healthy` (start-up, user-given servers after a failure) and for `SGLangClient.health`. A real HTTP server
whose /health answers 200 after DELAY_S stands in for a busy SGLang."""

import asyncio
import threading
import time

from aiohttp import web

from topd_ds.engines.launch import HEALTH_PROBE_TIMEOUT_S, free_port, wait_healthy
from topd_ds.engines.sglang import SGLangClient

DELAY_S = 5.5   # longer than the old probes (2 s in wait_healthy, 5 s in SGLangClient.health), well inside 20 s


class SlowHealthServer:
    """aiohttp on its own thread; GET /health sleeps `delay_s`, then 200."""

    def __init__(self, delay_s: float):
        self.delay_s, self.port, self.calls = delay_s, free_port(), 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def health(self, request):
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return web.Response(text="")

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/health", self.health)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_slow_health_answer_counts_as_healthy():
    assert HEALTH_PROBE_TIMEOUT_S >= 20.0 + 5.0   # SGLang's own health timeout plus a margin
    with SlowHealthServer(DELAY_S) as url:
        t0 = time.monotonic()
        wait_healthy(url, timeout_s=3 * DELAY_S)          # the old 2 s probes never saw an answer: ServerError
        waited = time.monotonic() - t0

        async def probe():
            async with SGLangClient([url]) as client:
                return await client.health()
        healthy = asyncio.run(probe())
    assert DELAY_S - 0.5 < waited < 2 * DELAY_S, waited   # one probe, answered when the server was done
    assert healthy
