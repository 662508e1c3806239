"""The simulator server's behaviour over time: disconnects, hangs, stalls, TPM limits, brownouts, the log."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest

from tailrace.engine.sim import BrownoutConfig, Fault, SimServer, make_features, plan_response, scenario

Start = Callable[..., Awaitable[SimServer]]
CLIENTS: list[Any] = []  # SDK clients made by a test, closed by the fixture
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there"}]


def oa(sim: SimServer, **kw: Any) -> openai.AsyncOpenAI:
    CLIENTS.append(
        openai.AsyncOpenAI(base_url=sim.openai_base_url, max_retries=0, **{"timeout": 10, "api_key": "sk-test", **kw})
    )
    return CLIENTS[-1]


def an(sim: SimServer, **kw: Any) -> anthropic.AsyncAnthropic:
    CLIENTS.append(
        anthropic.AsyncAnthropic(
            base_url=sim.anthropic_base_url, max_retries=0, **{"timeout": 10, "api_key": "sk-ant-test", **kw}
        )
    )
    return CLIENTS[-1]


async def records_when(sim: SimServer, n: int, timeout: float = 3.0) -> list[dict[str, Any]]:
    """The log once it has `n` records: a handler writes its record as it unwinds after a disconnect."""
    end = time.monotonic() + timeout
    while len(sim.log_records()) < n and time.monotonic() < end:
        await asyncio.sleep(0.01)
    return sim.log_records()


async def test_disconnect_mid_stream_is_logged_as_cancelled_with_partial_tokens(start_sim: Start) -> None:
    # A slow decode so the client can leave half-way through.
    sim = await start_sim(
        time_scale=0.02,
        model_profiles={
            "slow": {
                "ttft_median_s": 0.5,
                "ttft_sigma": 0.0,
                "tokens_per_s": 20,
                "output_tokens_median": 400,
                "output_tokens_sigma": 0.0,
            }
        },
    )
    stream = await oa(sim).chat.completions.create(
        model="slow",
        messages=MESSAGES,
        max_tokens=1000,  # type: ignore[arg-type]
        stream=True,
    )
    got = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 3:
                break
    await stream.close()
    [rec] = await records_when(sim, 1)
    assert rec["cancelled"] is True and rec["status"] == 200 and rec["stream"] is True
    assert 0 < rec["output_tokens"] < 400
    stats = sim.stats()
    assert stats["cancelled"] == {"count": 1, "output_tokens_before_cancel": rec["output_tokens"]}


async def test_non_stream_timeout_is_cancelled_with_tokens_by_elapsed_time(start_sim: Start) -> None:
    sim = await start_sim(
        time_scale=0.02,
        model_profiles={
            "slow": {
                "ttft_median_s": 1.0,
                "ttft_sigma": 0.0,
                "tokens_per_s": 20,
                "tps_sigma": 0.0,
                "output_tokens_median": 400,
                "output_tokens_sigma": 0.0,
            }
        },
    )
    # ttft 20 ms, then 400 tokens at 1000 tok/s real: a 0.2 s timeout leaves after ~180 tokens.
    with pytest.raises(openai.APITimeoutError):
        await oa(sim, timeout=0.2).chat.completions.create(model="slow", messages=MESSAGES, max_tokens=1000)  # type: ignore[arg-type]
    [rec] = await records_when(sim, 1)
    assert rec["cancelled"] is True and rec["status"] == 0
    assert 60 < rec["output_tokens"] < 360


async def test_hang_lasts_until_the_client_gives_up(start_sim: Start) -> None:
    sim = await start_sim(force_fault={"gpt-4o": Fault.HANG})
    client = oa(sim, timeout=0.15)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100)  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.15
    # Streams hang in two shapes: no headers at all, or headers and the prelude but no token.
    for i in range(6):
        with pytest.raises(openai.APITimeoutError):
            s = await client.chat.completions.create(
                model="gpt-4o",
                messages=[*MESSAGES, {"role": "user", "content": str(i)}],  # type: ignore[list-item]
                max_tokens=100,
                stream=True,
            )
            async for chunk in s:
                assert not (chunk.choices and chunk.choices[0].delta.content)
    recs = await records_when(sim, 7)
    assert {r["fault"] for r in recs} == {"hang"} and all(r["cancelled"] for r in recs)
    assert all(r["output_tokens"] == 0 for r in recs)
    assert recs[0]["status"] == 0 and {r["status"] for r in recs[1:]} == {0, 200}


async def test_stall_pauses_mid_stream_then_continues(start_sim: Start) -> None:
    sim = await start_sim(force_fault={"gpt-4o": Fault.STALL}, stall_s=(20.0, 20.0))  # 0.2 s real
    s = await oa(sim).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300, stream=True)  # type: ignore[arg-type]
    arrivals, finish = [], None
    async for chunk in s:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert finish == "stop" and max(gaps) >= 0.18 and sorted(gaps)[-2] < 0.1


async def test_tpm_scenario_rejects_past_the_limit_with_headers(start_sim: Start) -> None:
    # 1000 tokens per simulated minute = per 0.6 s real; each request reserves ~8 + 300 tokens.
    sim = await start_sim("tpm", tpm_limit=1000)
    client = oa(sim)
    # max_tokens is charged at admission (and corrected to use at the end): five at once overrun the window.
    results = await asyncio.gather(
        *(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=300) for _ in range(5)),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    assert sum(r["status"] == 200 for r in sim.log_records()) >= 3
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert limited, results

    class _Info:  # what pytest.raises used to hand over
        value = limited[0]

    info = _Info()
    headers = info.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 308
    assert headers["x-ratelimit-reset-tokens"].endswith("ms")
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 600 and int(headers["retry-after"]) >= 1
    assert info.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    # Another key has its own window; the same key is admitted again after the hinted wait.
    other = oa(sim, api_key="sk-other")
    await other.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=300)  # type: ignore[arg-type]
    await asyncio.sleep(wait_ms / 1000 + 0.02)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=300)  # type: ignore[arg-type]

    # Anthropic too gives unused output reservations back at the end: only concurrent requests overrun.
    ant = an(sim)
    results = await asyncio.gather(
        *(
            ant.messages.create(model="claude-haiku-4-5", max_tokens=300, messages=[{"role": "user", "content": "hi"}])
            for _ in range(5)
        ),
        return_exceptions=True,
    )
    [err] = [r for r in results if isinstance(r, Exception)][:1]
    assert isinstance(err, anthropic.RateLimitError)
    h = err.response.headers
    assert h["anthropic-ratelimit-tokens-limit"] == "1000" and "retry-after" in h
    assert err.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    stats = sim.stats()
    assert stats["status_429"] == len(limited) + sum(isinstance(r, anthropic.RateLimitError) for r in results)
    assert all(v["enforced"] and v["tpm_limit"] == 1000 for v in stats["keys"].values())
    assert "sk-test" not in json.dumps(stats) and "sk-test" not in json.dumps(sim.log_records())
    limited = [r for r in sim.log_records() if r["status"] == 429]
    assert {r["limited"] for r in limited} == {"tokens"} and {r["fault"] for r in limited} == {"rate_limited"}


async def test_brownout_degrades_only_the_chosen_model(start_sim: Start) -> None:
    always = BrownoutConfig(model="gpt-4.1", offset_s=0, period_s=1e6, duration_s=1e6, overloaded_rate=0.5)
    sim = await start_sim("brownout", brownout=always)
    client = oa(sim)
    statuses: dict[str, list[int]] = {"gpt-4.1": [], "gpt-4o-mini": []}
    for model, seen in statuses.items():
        for i in range(12):
            try:
                await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=100
                )
                seen.append(200)
            except openai.InternalServerError as err:
                assert err.body["code"] == "server_is_overloaded"  # type: ignore[index]
                seen.append(err.status_code)
    assert 503 in statuses["gpt-4.1"] and 200 in statuses["gpt-4.1"]
    assert set(statuses["gpt-4o-mini"]) == {200}
    recs = sim.log_records()
    assert all(r["degraded"] == (r["model"] == "gpt-4.1") for r in recs)
    # Outside its window the same model is healthy.
    later = await start_sim("brownout", brownout={"model": "gpt-4.1", "offset_s": 1e6})
    later_client = oa(later)
    for i in range(12):
        await later_client.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=100
        )


async def test_brownout_auto_picks_the_first_openai_mid_or_strong_model(start_sim: Start) -> None:
    sim = await start_sim(
        "brownout",
        brownout={"model": "auto", "offset_s": 0, "period_s": 1e6, "duration_s": 1e6, "overloaded_rate": 0.0},
    )
    await an(sim).messages.create(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    client = oa(sim)
    for model in ("gpt-4o-mini", "gpt-5", "gpt-4.1"):
        await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=50)  # type: ignore[arg-type]
    assert {r["model"]: r["degraded"] for r in sim.log_records()} == {
        "gpt-4o-mini": False,
        "claude-sonnet-4-5": False,
        "gpt-5": True,
        "gpt-4.1": False,
    }


async def test_concurrency_does_not_change_outcomes(start_sim: Start) -> None:
    rates = {Fault.HTTP_500: 0.2, Fault.EMPTY: 0.2, Fault.OVERLOADED: 0.1}
    sim = await start_sim(fault_rates=rates, seed=9)
    client = oa(sim)

    async def ask(i: int) -> str:
        try:
            c = await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=200
            )
            return "empty" if c.choices[0].message.content == "" else "ok"
        except openai.InternalServerError as err:
            return "http_500" if err.status_code == 500 else "overloaded"

    got = await asyncio.gather(*(ask(i) for i in range(30)))
    cfg = scenario("clean", fault_rates=rates, seed=9, time_scale=0.01)
    expected = [
        plan_response(cfg, make_features("openai", "gpt-4o", [f"question {i}"], 200), 0).fault.value for i in range(30)
    ]
    assert list(got) == expected and len(set(expected)) > 2


async def test_same_request_again_gets_a_fresh_draw(start_sim: Start) -> None:
    sim = await start_sim()
    client = oa(sim)
    a = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=200)  # type: ignore[arg-type]
    b = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=200)  # type: ignore[arg-type]
    assert a.choices[0].message.content != b.choices[0].message.content
    assert [r["occurrence"] for r in sim.log_records()] == [0, 1]


async def test_log_file_stats_and_health(start_sim: Start, tmp_path: Path) -> None:
    log = tmp_path / "sim.jsonl"
    sim = await start_sim(log_path=log, script={"gpt-4o": [Fault.HTTP_500]})
    client = oa(sim)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=100,  # type: ignore[arg-type]
            extra_headers={"Idempotency-Key": "run1-step2"},
        )
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100)  # type: ignore[arg-type]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["fault"] for r in lines] == ["http_500", "ok"] and [r["status"] for r in lines] == [500, 200]
    first = lines[0]
    assert first["idempotency_key"] == "run1-step2" and first["retry_count"] == "0"
    assert first["api"] == "openai" and first["model"] == "gpt-4o" and first["cancelled"] is False
    for key in ("ts", "request_id", "key_hash", "stream", "input_tokens", "output_tokens", "duration_s"):
        assert key in first
    assert "sk-test" not in log.read_text()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sim.anthropic_base_url}/health") as resp:
            assert (await resp.json())["status"] == "ok"
        async with session.get(f"{sim.anthropic_base_url}/stats") as resp:
            stats = await resp.json()
    model = stats["models"]["gpt-4o"]
    assert model["by_fault"] == {"http_500": 1, "ok": 1} and model["by_status"] == {"500": 1, "200": 1}
    assert model["input_tokens"] == 2 * lines[0]["input_tokens"] and model["output_tokens"] > 0


def test_in_thread_with_sync_clients() -> None:
    with SimServer.in_thread(scenario("clean", time_scale=0.01)) as sim:
        assert sim.openai_base_url == f"http://127.0.0.1:{sim.port}/v1"
        assert sim.anthropic_base_url == f"http://127.0.0.1:{sim.port}"
        c = openai.OpenAI(base_url=sim.openai_base_url, api_key="sk-test", max_retries=0)
        assert c.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100).choices  # type: ignore[arg-type]
        a = anthropic.Anthropic(base_url=sim.anthropic_base_url, api_key="k", max_retries=0)
        assert a.messages.create(
            model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ).content
        assert sim.stats()["requests"] == 2
        port = sim.port
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"http://127.0.0.1:{port}/health")


def test_a_request_is_in_the_log_by_the_time_its_client_has_the_whole_answer() -> None:
    """The simulator logged a stream after its last bytes, so a test reading the log right after its
    client finished could miss it (2 to 4 of 200 requests here); now it logs before the last bytes go out."""
    with SimServer.in_thread(scenario("clean", seed=2, time_scale=0.001)) as sim:
        oa_sync = openai.OpenAI(base_url=sim.openai_base_url, api_key="sk-test", max_retries=0)
        an_sync = anthropic.Anthropic(base_url=sim.anthropic_base_url, api_key="k", max_retries=0)
        missed = 0
        for i in range(100):
            for _ in oa_sync.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=20, stream=True
            ):  # type: ignore[arg-type]
                pass
            with an_sync.messages.stream(
                model="claude-haiku-4-5", max_tokens=20, messages=[{"role": "user", "content": f"hi {i}"}]
            ) as stream:
                stream.until_done()
            missed += len(sim.log_records()) != 2 * (i + 1)
            while len(sim.log_records()) != 2 * (i + 1):  # the next round counts on its own
                time.sleep(0.001)
        assert missed == 0


async def test_stop_ends_hung_requests(start_sim: Start) -> None:
    sim = await start_sim(force_fault={"gpt-4o": Fault.HANG})
    task = asyncio.create_task(
        oa(sim, timeout=30).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100)
    )  # type: ignore[arg-type]
    while sim.stats()["in_flight"] == 0:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await sim.stop()
    assert time.monotonic() - started < 2.5
    with pytest.raises(openai.APIConnectionError):
        await task
    assert sim.log_records()[0]["cancelled"] is True
