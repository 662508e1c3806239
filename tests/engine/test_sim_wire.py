"""The simulator through the real OpenAI and Anthropic SDKs: answers, streams, errors, finish reasons."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import httpx2
import jsonschema
import openai
import pytest

from tailrace.engine.sim import REFUSAL_TEXT, Fault, SimServer

SCHEMA = {
    "type": "object",
    "required": ["ticket_id", "intent", "reply"],
    "properties": {
        "ticket_id": {"type": "string"},
        "intent": {"enum": ["refund", "delivery", "other"]},
        "reply": {"type": "string"},
    },
}
SYSTEM = (
    f"Answer with only a JSON object conforming to <schema>{json.dumps(SCHEMA)}</schema>. "
    'Copy these identifiers verbatim: <ids>["TCK-1042"]</ids>'
)
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is my order?"}]

Start = Callable[..., Awaitable[SimServer]]
CLIENTS: list[Any] = []  # SDK clients made by a test, closed by the fixture


def oa(sim: SimServer) -> openai.AsyncOpenAI:
    """One client per server: building an SDK client costs tens of milliseconds."""
    for c in CLIENTS:
        if isinstance(c, openai.AsyncOpenAI) and str(c.base_url).rstrip("/") == sim.openai_base_url:
            return c
    CLIENTS.append(openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key="sk-test", max_retries=0, timeout=10))
    return CLIENTS[-1]


def an(sim: SimServer) -> anthropic.AsyncAnthropic:
    for c in CLIENTS:
        if isinstance(c, anthropic.AsyncAnthropic) and str(c.base_url).rstrip("/") == sim.anthropic_base_url:
            return c
    CLIENTS.append(
        anthropic.AsyncAnthropic(base_url=sim.anthropic_base_url, api_key="sk-ant-test", max_retries=0, timeout=10)
    )
    return CLIENTS[-1]


def assert_valid(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)
    assert "TCK-1042" in text


# ---- OpenAI ---------------------------------------------------------------------------------------


async def test_openai_answer_headers_and_usage(start_sim: Start) -> None:
    sim = await start_sim()
    raw = await oa(sim).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=300
    )  # type: ignore[arg-type]
    completion = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    for name in ("limit", "remaining", "reset"):
        assert raw.headers[f"x-ratelimit-{name}-requests"] and raw.headers[f"x-ratelimit-{name}-tokens"]
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.refusal is None
    assert_valid(choice.message.content or "")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens == -(-sum(len(m["content"]) for m in MESSAGES) // 4)
    assert usage.completion_tokens == -(-len(choice.message.content or "") // 4)


async def test_openai_stream_text_and_usage(start_sim: Start) -> None:
    sim = await start_sim()
    stream = await oa(sim).chat.completions.create(
        model="gpt-4.1",
        messages=MESSAGES,
        max_tokens=300,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    text = "".join(parts)
    assert_valid(text)
    assert finish == "stop" and usage is not None and usage.completion_tokens == -(-len(text) // 4)


@pytest.mark.parametrize(
    ("fault", "status", "exc", "code"),
    [
        (Fault.HTTP_500, 500, openai.InternalServerError, None),
        (Fault.OVERLOADED, 503, openai.InternalServerError, "server_is_overloaded"),
        (Fault.RATE_LIMITED, 429, openai.RateLimitError, "rate_limit_exceeded"),
        (Fault.QUOTA, 429, openai.RateLimitError, "insufficient_quota"),
        (Fault.CONTEXT_LENGTH, 400, openai.BadRequestError, "context_length_exceeded"),
        (Fault.CONTENT_POLICY, 400, openai.BadRequestError, "content_policy_violation"),
        (Fault.AUTH, 401, openai.AuthenticationError, "invalid_api_key"),
        (Fault.TOO_LARGE, 413, openai.APIStatusError, "request_too_large"),
    ],
)
async def test_openai_errors(
    start_sim: Start, fault: Fault, status: int, exc: type[Exception], code: str | None
) -> None:
    sim = await start_sim(force_fault={"gpt-4o": fault})
    with pytest.raises(exc) as info:
        await oa(sim).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100)  # type: ignore[arg-type]
    err = info.value
    assert isinstance(err, openai.APIStatusError) and err.status_code == status
    assert isinstance(err.body, dict) and err.body["code"] == code and "message" in err.body
    assert err.response.headers["x-request-id"] == err.request_id
    assert ("retry-after" in err.response.headers) == (fault == Fault.RATE_LIMITED)
    if fault == Fault.RATE_LIMITED:
        assert int(err.response.headers["retry-after-ms"]) > 0


async def test_openai_reset_and_stream_errors(start_sim: Start) -> None:
    sim = await start_sim(script={"gpt-4o": [Fault.RESET]}, force_fault={"gpt-4o-mini": Fault.STREAM_ERROR})
    with pytest.raises(openai.APIConnectionError):
        await oa(sim).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100)  # type: ignore[arg-type]
    kinds = set()
    for i in range(16):
        stream = await oa(sim).chat.completions.create(
            model="gpt-4o-mini",
            messages=[*MESSAGES, {"role": "user", "content": str(i)}],  # type: ignore[list-item]
            max_tokens=300,
            stream=True,
        )
        got = 0
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                got += 1
        assert got >= 1  # the 200 and some chunks arrived before the failure
        kinds.add(type(info.value).__name__)
    assert kinds == {"APIError", "APIConnectionError"}  # an error event and an abrupt close


async def test_openai_truncated_refusal_filter_empty(start_sim: Start) -> None:
    sim = await start_sim(
        script={"gpt-4o": [Fault.TRUNCATED, Fault.TRUNCATED, Fault.REFUSAL, Fault.REFUSAL, Fault.FILTERED, Fault.EMPTY]}
    )
    client = oa(sim)
    c = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=60)  # type: ignore[arg-type]
    assert c.choices[0].finish_reason == "length" and c.usage and c.usage.completion_tokens == 60
    with pytest.raises(ValueError):
        json.loads(c.choices[0].message.content or "")
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=60,  # type: ignore[arg-type]
        stream=True,
    )
    finishes = [ch.choices[0].finish_reason async for ch in stream if ch.choices]
    assert finishes[-1] == "length"
    c = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100)  # type: ignore[arg-type]
    assert c.choices[0].message.content == REFUSAL_TEXT and c.choices[0].finish_reason == "stop"
    assert c.choices[0].message.refusal is None
    structured = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=100,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}},
    )
    assert structured.choices[0].message.content is None
    assert structured.choices[0].message.refusal == REFUSAL_TEXT
    c = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300)  # type: ignore[arg-type]
    assert c.choices[0].finish_reason == "content_filter"
    c = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300)  # type: ignore[arg-type]
    assert c.choices[0].message.content == "" and c.choices[0].finish_reason == "stop"


async def test_openai_structured_outputs_schema_wins(start_sim: Start) -> None:
    sim = await start_sim()
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    c = await oa(sim).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "count"}],
        max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    jsonschema.validate(json.loads(c.choices[0].message.content or ""), schema)


# ---- Anthropic ------------------------------------------------------------------------------------


async def test_anthropic_answer_headers_and_usage(start_sim: Start) -> None:
    sim = await start_sim()
    raw = await an(sim).messages.with_raw_response.create(
        model="claude-haiku-4-5",
        max_tokens=300,
        system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": "Where is my order?"}],
    )
    msg = await raw.parse()
    assert raw.headers["request-id"].startswith("req_")
    for family in ("requests", "tokens", "input-tokens", "output-tokens"):
        for name in ("limit", "remaining", "reset"):
            assert raw.headers[f"anthropic-ratelimit-{family}-{name}"]
    assert raw.headers["anthropic-ratelimit-tokens-reset"].endswith("Z")
    assert msg.stop_reason == "end_turn"
    text = msg.content[0].text  # type: ignore[union-attr]
    assert_valid(text)
    assert msg.usage.output_tokens == -(-len(text) // 4)
    assert msg.usage.input_tokens == -(-len(SYSTEM) // 4) + -(-len("Where is my order?") // 4)


async def test_anthropic_stream_through_sdk(start_sim: Start) -> None:
    sim = await start_sim()
    async with an(sim).messages.stream(
        model="claude-sonnet-4-5", max_tokens=300, system=SYSTEM, messages=[{"role": "user", "content": "Where?"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert_valid(text)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == -(-len(text) // 4)
    assert final.usage.input_tokens > 0


async def test_anthropic_raw_event_order(start_sim: Start) -> None:
    sim = await start_sim()
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "stream": True,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": "Where?"}],
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sim.anthropic_base_url}/v1/messages", json=body, headers={"x-api-key": "k"}) as resp,
    ):
        assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = [line[len("event: ") :] for line in raw.splitlines() if line.startswith("event: ")]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[3:-3]) == {"content_block_delta"}
    datas = [json.loads(line[len("data: ") :]) for line in raw.splitlines() if line.startswith("data: ")]
    assert datas[0]["message"]["usage"]["input_tokens"] > 0
    assert datas[-2]["delta"]["stop_reason"] == "end_turn" and datas[-2]["usage"]["output_tokens"] > 0


@pytest.mark.parametrize(
    ("fault", "status", "etype"),
    [
        (Fault.HTTP_500, 500, "api_error"),
        (Fault.OVERLOADED, 529, "overloaded_error"),
        (Fault.RATE_LIMITED, 429, "rate_limit_error"),
        (Fault.QUOTA, 429, "rate_limit_error"),
        (Fault.CONTEXT_LENGTH, 400, "invalid_request_error"),
        (Fault.CONTENT_POLICY, 400, "invalid_request_error"),
        (Fault.AUTH, 401, "authentication_error"),
        (Fault.TOO_LARGE, 413, "request_too_large"),
    ],
)
async def test_anthropic_errors(start_sim: Start, fault: Fault, status: int, etype: str) -> None:
    sim = await start_sim(force_fault={"claude-haiku-4-5": fault})
    with pytest.raises(anthropic.APIStatusError) as info:
        await an(sim).messages.create(
            model="claude-haiku-4-5", max_tokens=100, system=SYSTEM, messages=[{"role": "user", "content": "hi"}]
        )
    err = info.value
    assert err.status_code == status
    assert isinstance(err.body, dict) and err.body["type"] == "error" and err.body["error"]["type"] == etype
    assert err.body["request_id"] == err.response.headers["request-id"]
    assert ("retry-after" in err.response.headers) == (fault == Fault.RATE_LIMITED)
    if fault == Fault.OVERLOADED:
        assert isinstance(err, anthropic.OverloadedError)


async def test_anthropic_stream_error_and_reset(start_sim: Start) -> None:
    sim = await start_sim(
        script={"claude-haiku-4-5": [Fault.RESET]}, force_fault={"claude-sonnet-4-5": Fault.STREAM_ERROR}
    )
    with pytest.raises(anthropic.APIConnectionError):
        await an(sim).messages.create(
            model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
    kinds = set()
    for i in range(16):
        # The Anthropic SDK does not wrap a connection dropped mid-stream: the raw httpx2 error surfaces.
        with pytest.raises((anthropic.APIStatusError, httpx2.TransportError)) as info:
            async with an(sim).messages.stream(
                model="claude-sonnet-4-5",
                max_tokens=300,
                system=SYSTEM,
                messages=[{"role": "user", "content": f"q{i}"}],
            ) as stream:
                async for _ in stream:
                    pass
        if isinstance(info.value, anthropic.APIStatusError):
            assert info.value.status_code == 200  # the error arrived inside the 200 stream
            assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        kinds.add(isinstance(info.value, httpx2.TransportError))
    assert kinds == {True, False}


async def test_anthropic_stop_reasons(start_sim: Start) -> None:
    sim = await start_sim(script={"claude-opus-4-1": [Fault.TRUNCATED, Fault.REFUSAL, Fault.EMPTY]})
    client = an(sim)

    async def ask(max_tokens: int = 300) -> anthropic.types.Message:
        return await client.messages.create(
            model="claude-opus-4-1", max_tokens=max_tokens, system=SYSTEM, messages=[{"role": "user", "content": "hi"}]
        )

    m = await ask(50)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 50
    m = await ask()
    assert m.stop_reason == "refusal"
    m = await ask()
    assert m.stop_reason == "end_turn" and m.content == []


async def test_bad_requests_are_400(start_sim: Start) -> None:
    sim = await start_sim()
    with pytest.raises(anthropic.BadRequestError):
        await an(sim).messages.create(
            model="claude-haiku-4-5", max_tokens=0, messages=[{"role": "user", "content": "hi"}]
        )
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sim.openai_base_url}/chat/completions", data=b"{nope") as resp,
    ):
        assert resp.status == 400 and resp.headers["x-request-id"].startswith("req_")
        assert "x-ratelimit-remaining-tokens" in resp.headers
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
