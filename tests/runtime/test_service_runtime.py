"""ServiceRuntime, what every service process does around its servicers: ports, health, orderly stop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from igw.grpclib_server import GrpclibBackend
from igw.procs import free_port
from igw.service_runtime import ServiceRuntime


async def _healthy() -> tuple[bool, str]:
    return True, "OK"


@pytest.mark.asyncio
async def test_stop_ends_background_loops_only_after_the_grpc_server_stopped_serving() -> None:
    backend = GrpclibBackend([])
    runtime = ServiceRuntime(backend, ["svc"], logging.getLogger("test"))
    assert await runtime.start("127.0.0.1", free_port(), free_port(), _healthy)
    seen: list[bool] = []

    async def background_loop() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            assert backend.server is not None and backend.server._server is not None
            seen.append(backend.server._server.is_serving())
            raise

    runtime.spawn(background_loop())
    await asyncio.sleep(0)
    await runtime.stop(0.1)
    assert seen == [False]
    assert all(task.done() for task in runtime.tasks)
