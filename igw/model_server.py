"""`python -m igw.model_server --model NAME --port P`: one replica of a demo model over KServe v2 HTTP.

It is the upstream of the test bed and of the benchmarks, so it is kept small: aiohttp on uvloop, no
access log. Every answer names the replica (header x-igw-replica and parameters.replica) and echoes
the x-igw-* headers it received (parameters.received_headers), so end-to-end tests can check which
replica answered and what the gateway told it.

Readiness (GET /v2/health/ready) turns true only once the model is loaded (--load-delay simulates a slow
load). SIGUSR1 makes the replica unready and SIGUSR2 ready again, so failure tests can take a live
replica out of rotation; SIGTERM reports unready, then stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from aiohttp import web

from igw.demo_model import DemoModel, InferenceError, build_response, load_model, parse_request
from igw.runtime import EnvDefaults, parse_duration, parse_port, run_async, setup_logging

log = logging.getLogger("igw.model_server")

REPLICA_HEADER = "X-Igw-Replica"
DEBUG_HEADERS = ("x-request-id",)


class ModelServer:
    def __init__(self, model_name: str, replica: str, load_delay: float = 0.0) -> None:
        self.model_name = model_name
        self.replica = replica
        self.load_delay = load_delay
        self.model: DemoModel | None = None
        self.ready = False

    async def load(self) -> None:
        if self.load_delay:
            await asyncio.sleep(self.load_delay)
        self.model = load_model(self.model_name)
        self.ready = True
        log.info("model %s loaded, replica %s ready", self.model_name, self.replica)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.server_ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/models/{model}", self.model_metadata)
        app.router.add_get("/v2/models/{model}/ready", self.model_ready)
        app.router.add_post("/v2/models/{model}/infer", self.infer)
        # OpenAI-style calls name the model in the body; the gateway routed here on x-igw-model.
        app.router.add_post("/v1/{tail:.+}", self.infer_by_header)
        return app

    def _json(self, status: int, body: dict[str, Any]) -> web.Response:
        return web.Response(status=status, text=json.dumps(body, separators=(",", ":")),
                            content_type="application/json", headers={REPLICA_HEADER: self.replica})

    def _error(self, status: int, message: str) -> web.Response:
        return self._json(status, {"error": message})

    def _serves(self, request: web.Request) -> bool:
        """The path names this model, or the gateway routed here by canonical name (the path may hold an
        alias that ext_proc resolved into x-igw-model)."""
        return self.model_name in (request.match_info["model"], request.headers.get("x-igw-model"))

    async def live(self, _request: web.Request) -> web.Response:
        return self._json(200, {"live": True})

    async def server_ready(self, _request: web.Request) -> web.Response:
        return self._json(200 if self.ready else 503, {"ready": self.ready})

    async def server_metadata(self, _request: web.Request) -> web.Response:
        return self._json(200, {"name": "igw-demo-model-server", "version": "1", "extensions": []})

    async def model_metadata(self, request: web.Request) -> web.Response:
        if not self._serves(request):
            return self._error(404, f"model {request.match_info['model']!r} is not served here")
        if self.model is None:
            return self._error(503, f"model {self.model_name!r} is loading")
        return self._json(200, self.model.metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        if not self._serves(request):
            return self._error(404, f"model {request.match_info['model']!r} is not served here")
        return self._json(200 if self.ready else 503, {"name": self.model_name, "ready": self.ready})

    async def infer(self, request: web.Request) -> web.Response:
        if not self._serves(request):
            return self._error(404, f"model {request.match_info['model']!r} is not served here")
        return await self._infer(request)

    async def infer_by_header(self, request: web.Request) -> web.Response:
        """`POST /v1/...` with the model in the JSON body (OpenAI style): served when the gateway's
        x-igw-model names this model; the body carries KServe v2 `inputs` next to `model`."""
        named = request.headers.get("x-igw-model")
        if named != self.model_name:
            return self._error(404, f"x-igw-model {named!r} does not name the model served here")
        return await self._infer(request)

    async def _infer(self, request: web.Request) -> web.Response:
        if self.model is None or not self.ready:
            return self._error(503, f"model {self.model_name!r} is not ready")
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return self._error(400, f"request body is not JSON: {exc}")
        try:
            batch, request_id = parse_request(body)
        except InferenceError as exc:
            return self._error(400, str(exc))
        seen = {k.lower(): v for k, v in request.headers.items()
                if k.lower().startswith("x-igw-") or k.lower() in DEBUG_HEADERS}
        return self._json(200, build_response(self.model, batch, request_id,
                                              {"replica": self.replica, "received_headers": seen}))


def build_parser() -> tuple[argparse.ArgumentParser, EnvDefaults]:
    parser = argparse.ArgumentParser(prog="python -m igw.model_server",
                                     description="A demo model replica served over KServe v2 HTTP.")
    env = EnvDefaults(parser)
    env.add("--model", "MODEL_NAME", default=None, help="model name (required)")
    env.add("--host", "MODEL_HOST", default="127.0.0.1", help="address to bind")
    env.add("--port", "MODEL_PORT", default=8000, type=parse_port, help="HTTP port")
    env.add("--replica", "MODEL_REPLICA", default="", help="replica name echoed in answers (default NAME@HOST:PORT)")
    env.add("--load-delay", "MODEL_LOAD_DELAY", default=0.0, type=parse_duration,
            help="wait this long before the model counts as loaded")
    env.add("--log-level", "LOG_LEVEL", default="info", help="log level")
    return parser, env


async def serve(server: ModelServer, host: str, port: int, stop: asyncio.Event) -> int:
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot bind %s:%d: %s", host, port, exc)
        await runner.cleanup()
        return 1
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(server, "ready", False))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(server, "ready", server.model is not None))
    log.info("model server %s listening on %s:%d pid=%d", server.replica, host, port, os.getpid())
    loader = asyncio.create_task(server.load())
    await stop.wait()
    server.ready = False
    loader.cancel()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, env = build_parser()
    args = env.parse(sys.argv[1:] if argv is None else argv)
    if not args.model:
        parser.error("--model (or MODEL_NAME) is required")
    setup_logging(args.log_level, "text")
    server = ModelServer(args.model, args.replica or f"{args.model}@{args.host}:{args.port}", args.load_delay)
    return run_async(lambda stop: serve(server, args.host, args.port, stop))


if __name__ == "__main__":
    sys.exit(main())
