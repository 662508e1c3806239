"""The simulator's HTTP server: acts out each request's `ResponsePlan` on the wire (aiohttp).

The handler is shared by both APIs; a `Wire` supplies the bytes. Client disconnects are detected
two ways, because either alone misses cases: aiohttp cancels the handler when the connection is
lost (`handler_cancellation=True`), and a write to a closed connection raises ConnectionResetError.
Both end in a log record with `cancelled: true` and the tokens generated until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tailrace.engine.clock import SYSTEM_CLOCK, Clock, Deadline, wait_all
from tailrace.engine.sim.config import ERROR_FAULTS, Fault, SimConfig, profile_class
from tailrace.engine.sim.log import RequestLog, RequestRecord, key_hash
from tailrace.engine.sim.planner import Finish, RequestFeatures, ResponsePlan, plan_response
from tailrace.engine.sim.ratelimit import RateLimiter, retry_after_headers
from tailrace.engine.sim.wire import BadRequest, Exchange, Wire
from tailrace.engine.sim.wire_anthropic import STOP as ANTHROPIC_STOP
from tailrace.engine.sim.wire_anthropic import AnthropicWire
from tailrace.engine.sim.wire_openai import FINISH as OPENAI_FINISH
from tailrace.engine.sim.wire_openai import OpenAIWire


@dataclass
class _Progress:
    """What one request has done so far; read when it ends, however it ends."""

    status: int = 0
    fault: str = "ok"
    sent_chars: int = 0
    gen_started: float | None = None  # real monotonic time generation began (non-streaming)
    finished: bool = False
    finish: str | None = None
    limited: str | None = None
    # Logs the request (once). Called before the last byte the client sees, so a client that has its
    # answer finds the request in the log; otherwise when the handler ends, however it ends.
    record: Callable[[bool], None] = lambda cancelled: None

    def complete(self) -> None:
        self.finished = True
        self.record(False)


class SimServer:
    """A provider simulator on one port. Start with `await start()` or `SimServer.in_thread(...)`."""

    def __init__(self, config: SimConfig, log_path: str | Path | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self._clock = clock
        self._log = RequestLog(log_path)
        self._limiter = RateLimiter(config.tpm_limit, config.rpm_limit)
        self._limiter_lock = threading.Lock()  # stats() may be called from another thread
        self._occurrences: dict[str, int] = defaultdict(int)
        self._per_model: dict[str, int] = defaultdict(int)
        self._inflight: set[asyncio.Task[Any]] = set()
        self._t0 = clock.monotonic()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._host = "127.0.0.1"
        self._openai = OpenAIWire(config.default_max_tokens)
        self._anthropic = AnthropicWire(clock.time)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle_openai)
        app.router.add_post("/v1/messages", self._handle_anthropic)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_get("/health", self._handle_health)
        # handler_cancellation: a client disconnect cancels its handler, so hangs end and are logged.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._host = host
        self._port = int(self._runner.addresses[0][1])
        self._t0 = self._clock.monotonic()

    async def stop(self) -> None:
        # Hung handlers would otherwise hold the shutdown for its whole timeout.
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await wait_all(self._inflight, Deadline.after(2.0, self._clock))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._log.close()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not started")
        return self._port

    @property
    def openai_base_url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def sim_time(self) -> float:
        """Simulated seconds since start."""
        return (self._clock.monotonic() - self._t0) / self.config.time_scale

    def stats(self) -> dict[str, Any]:
        with self._limiter_lock:
            usage = self._limiter.usage(self.sim_time())
        return {
            "scenario": self.config.name,
            "seed": self.config.seed,
            "time_scale": self.config.time_scale,
            "sim_time_s": round(self.sim_time(), 3),
            "in_flight": len(self._inflight),
            **self._log.summary(),
            "keys": usage,
        }

    def log_records(self) -> list[dict[str, Any]]:
        return self._log.records()

    @classmethod
    @contextlib.contextmanager
    def in_thread(cls, config: SimConfig, log_path: str | Path | None = None) -> Iterator[SimServer]:
        """Run a server on its own thread and event loop (127.0.0.1, a free port); stop on exit."""
        server = cls(config, log_path)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="tailrace-sim", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
            yield server
        finally:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    # ---- handlers -----------------------------------------------------------------------------

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "scenario": self.config.name})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle_openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._openai)

    async def _handle_anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._anthropic)

    async def _sleep(self, sim_seconds: float) -> None:
        await self._clock.sleep(max(0.0, sim_seconds) * self.config.time_scale)

    def _latch_brownout(self, features: RequestFeatures) -> None:
        """Resolve `brownout.model="auto"` to the first OpenAI mid/strong model requested."""
        b = self.config.brownout
        if (
            b is not None
            and b.model == "auto"
            and features.api == "openai"
            and profile_class(features.model) in ("mid", "strong")
        ):
            self.config = self.config.model_copy(update={"brownout": b.model_copy(update={"model": features.model})})

    def _forced(self, model: str) -> Fault | None:
        """The scripted fault of this model's n-th request, else its forced fault, else None."""
        n = self._per_model[model]
        self._per_model[model] += 1
        script = self.config.script.get(model, [])
        return script[n] if n < len(script) else self.config.force_fault.get(model)

    async def _handle(self, request: web.Request, wire: Wire) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        started, arrival = self._clock.monotonic(), self.sim_time()
        api_key = (
            request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        )
        prog = _Progress()
        features: RequestFeatures | None = None
        plan: ResponsePlan | None = None
        occurrence, cancelled, recorded = 0, False, False

        def record(cancelled: bool) -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self._record(
                    request, wire, features, plan, prog, key_hash(api_key), occurrence, cancelled, started, arrival
                )

        prog.record = record
        try:
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                features, include_usage = wire.parse(body)
            except (BadRequest, ValueError) as err:
                bad = err if isinstance(err, BadRequest) else BadRequest(f"invalid JSON body: {err}")
                prog.status, prog.fault, prog.finished = 400, "bad_request", True
                rid = wire.full_request_id(uuid.uuid4().hex[:24])
                with self._limiter_lock:
                    snapshot = self._limiter.peek(key_hash(api_key), self.sim_time())
                headers = {wire.request_id_header: rid, **wire.limit_headers(snapshot, self.config.time_scale)}
                return web.json_response(wire.bad_request_body(bad, rid), status=400, headers=headers)
            self._latch_brownout(features)
            occurrence = self._occurrences[features.content_key]
            self._occurrences[features.content_key] += 1
            plan = plan_response(self.config, features, occurrence, arrival, self._forced(features.model))
            ex = Exchange(features, plan, wire.full_request_id(plan.request_id), include_usage, int(self._clock.time()))
            return await self._act(request, wire, ex, key_hash(api_key), prog)
        except (asyncio.CancelledError, ConnectionResetError):
            cancelled = not prog.finished
            raise
        finally:
            if task is not None:
                self._inflight.discard(task)
            record(cancelled)

    async def _act(
        self, request: web.Request, wire: Wire, ex: Exchange, key: str, prog: _Progress
    ) -> web.StreamResponse:
        plan, features = ex.plan, ex.features
        prog.fault = plan.fault.value
        charge = features.prompt_tokens + features.max_tokens
        with self._limiter_lock:
            adm = self._limiter.admit(key, charge, self.sim_time())
        headers = {wire.request_id_header: ex.request_id, **wire.limit_headers(adm.snapshot, self.config.time_scale)}
        if not adm.ok:
            real_wait = adm.retry_after_s * self.config.time_scale if adm.retry_after_s is not None else None
            if adm.retry_after_s is not None:
                headers.update(retry_after_headers(adm.retry_after_s, self.config.time_scale))
            prog.status, prog.fault, prog.limited, prog.finished = 429, Fault.RATE_LIMITED.value, adm.reason, True
            body = wire.rate_limit_body(adm.reason, ex.request_id, features.model, adm.snapshot, charge, real_wait)
            return web.json_response(body, status=429, headers=headers)

        if plan.fault in ERROR_FAULTS or plan.fault == Fault.RESET:
            await self._sleep(plan.ttft_s)
            if plan.fault == Fault.RESET:
                prog.complete()
                self._abort(request)
                return web.Response(status=500)  # never reaches the client: the socket is gone
            real_wait = None
            if plan.retry_after_s is not None:
                real_wait = plan.retry_after_s * self.config.time_scale
                headers.update(retry_after_headers(plan.retry_after_s, self.config.time_scale))
            prog.status, prog.finished = plan.status, True
            return web.json_response(
                wire.error_body(plan.fault, ex.request_id, features, real_wait), status=plan.status, headers=headers
            )
        if plan.fault == Fault.HANG and not plan.hang_after_headers:
            await asyncio.Event().wait()  # until the client leaves or the server stops
        if features.stream:
            return await self._stream(request, wire, ex, headers, prog)
        return await self._full(request, wire, ex, headers, prog)

    async def _full(
        self, request: web.Request, wire: Wire, ex: Exchange, headers: dict[str, str], prog: _Progress
    ) -> web.StreamResponse:
        plan = ex.plan
        await self._sleep(plan.ttft_s)
        prog.gen_started = self._clock.monotonic()
        await self._sleep(plan.generation_s + plan.stall_s)
        data = json.dumps(wire.response_body(ex)).encode()
        if plan.fault == Fault.STREAM_ERROR:
            # Without a stream the failure is a body cut short: headers promise more than arrives.
            resp = web.StreamResponse(status=200, headers={**headers, "content-type": "application/json"})
            resp.content_length = len(data)
            prog.status = 200
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            prog.sent_chars = len(plan.text) // 2
            prog.complete()
            self._abort(request)
            return resp
        prog.status, prog.finished, prog.sent_chars = 200, True, len(plan.text)
        prog.finish = self._finish_name(wire, plan.finish)
        return web.Response(body=data, status=200, headers={**headers, "content-type": "application/json"})

    async def _stream(
        self, request: web.Request, wire: Wire, ex: Exchange, headers: dict[str, str], prog: _Progress
    ) -> web.StreamResponse:
        plan = ex.plan
        # Headers and the prelude come a little before the first token, as with the real APIs.
        await self._sleep(plan.ttft_s * 0.25)
        resp = web.StreamResponse(
            status=200,
            headers={**headers, "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"},
        )
        prog.status = 200
        await resp.prepare(request)
        await resp.write(b"".join(wire.prelude(ex)))
        if plan.fault == Fault.HANG:
            await asyncio.Event().wait()
        await self._sleep(plan.ttft_s * 0.75)
        gap = plan.generation_s / max(1, len(plan.chunks))
        for i in range(len(plan.chunks) + 1):
            if i == plan.stall_after_chunk:
                await self._sleep(plan.stall_s)
            if i == plan.error_after_chunk or (i == len(plan.chunks) and plan.error_after_chunk is not None):
                prog.complete()
                if plan.error_as_event:
                    await resp.write(wire.stream_error(ex))
                    await resp.write_eof()
                else:
                    self._abort(request)
                return resp
            if i == len(plan.chunks):
                break
            if i > 0:
                await self._sleep(gap)
            await resp.write(wire.delta(ex, plan.chunks[i]))
            prog.sent_chars += len(plan.chunks[i])
        prog.finish = self._finish_name(wire, plan.finish)
        prog.complete()
        await resp.write(b"".join(wire.finish(ex, plan.output_tokens)))
        await resp.write_eof()
        return resp

    @staticmethod
    def _abort(request: web.Request) -> None:
        if request.transport is not None:
            request.transport.abort()

    @staticmethod
    def _finish_name(wire: Wire, finish: Finish) -> str:
        return (OPENAI_FINISH if wire.api == "openai" else ANTHROPIC_STOP)[finish]

    def _generated_tokens(self, plan: ResponsePlan | None, prog: _Progress) -> int:
        """Tokens the model produced: what was sent, or for a non-stream wait, what time allows."""
        if plan is None:
            return 0
        chars = prog.sent_chars
        if prog.gen_started is not None and not prog.finished:
            elapsed_sim = (self._clock.monotonic() - prog.gen_started) / self.config.time_scale
            chars = max(chars, int(min(plan.output_tokens, elapsed_sim * plan.tokens_per_s) * 4))
        return min(plan.output_tokens, math.ceil(min(chars, len(plan.text)) / 4))

    def _record(
        self,
        request: web.Request,
        wire: Wire,
        features: RequestFeatures | None,
        plan: ResponsePlan | None,
        prog: _Progress,
        key: str,
        occurrence: int,
        cancelled: bool,
        started: float,
        arrival: float,
    ) -> None:
        output = self._generated_tokens(plan, prog)
        if features is not None and prog.limited is None:
            # Both providers reserve max_tokens of output at admission and correct it to use at the end.
            with self._limiter_lock:
                self._limiter.refund(key, features.max_tokens - output, self.sim_time())
        h = request.headers
        self._log.add(
            RequestRecord(
                ts=self._clock.time(),
                request_id=wire.full_request_id(plan.request_id) if plan else "",
                api=wire.api,
                model=features.model if features else "",
                key_hash=key,
                fault=prog.fault,
                status=prog.status,
                stream=features.stream if features else False,
                input_tokens=features.prompt_tokens if features else 0,
                output_tokens=output,
                cancelled=cancelled,
                duration_s=round(self._clock.monotonic() - started, 4),
                idempotency_key=h.get("idempotency-key") or h.get("x-idempotency-key"),
                retry_count=h.get("x-stainless-retry-count"),
                occurrence=occurrence,
                finish=prog.finish,
                limited=prog.limited,
                degraded=plan.degraded if plan else False,
                sim_time_s=round(arrival, 3),
            )
        )


def run_forever(
    config: SimConfig, host: str = "127.0.0.1", port: int = 8765, log_path: str | Path | None = None
) -> None:
    """Serve until Ctrl-C (the `tailrace sim` command)."""

    async def main() -> None:
        server = SimServer(config, log_path)
        await server.start(host, port)
        print(f"tailrace sim: scenario {config.name!r}, seed {config.seed}, time_scale {config.time_scale}")
        print(f"  OpenAI:    base_url={server.openai_base_url}")
        print(f"  Anthropic: base_url={server.anthropic_base_url}")
        print(f"  stats:     http://{host}:{server.port}/stats   (Ctrl-C stops)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
