"""ServiceRuntime, what every service process does around its servicers: ports, health, orderly stop."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw.grpclib_server import NOT_SERVING, GrpclibBackend
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


@pytest.mark.asyncio
async def test_while_draining_a_probe_loop_setting_serving_again_leaves_health_not_serving() -> None:
    backend = GrpclibBackend([])
    runtime = ServiceRuntime(backend, ["svc"], logging.getLogger("test"))
    assert await runtime.start("127.0.0.1", free_port(), free_port(), _healthy)
    try:
        await runtime.set_serving(True)
        await runtime.drain(30)
        await runtime.set_serving(True)  # what the services' Redis probes do every few hundred milliseconds
        assert backend.health is not None
        assert set(backend.health.status.values()) == {NOT_SERVING}
    finally:
        await runtime.stop(0.1)


@pytest.mark.asyncio
async def test_stop_does_not_wait_its_grace_for_calls_that_already_finished() -> None:
    backend = GrpclibBackend([])
    port = free_port()
    assert await backend.bind("127.0.0.1", port, ["svc"]) is None

    def check() -> int:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="svc"),
                                                             timeout=5).status

    assert await asyncio.to_thread(check) is not None
    # grpclib keeps a finished call's task until its next clean-up: counting it as in flight made every stop
    # wait the whole grace. A grace far longer than the timeout tells the two apart without timing anything.
    await asyncio.wait_for(backend.stop(grace=600), 30)
