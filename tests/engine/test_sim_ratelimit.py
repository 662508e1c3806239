"""The simulator's TPM window the way OpenAI and Anthropic keep theirs: prompt + max_tokens charged at
admission, corrected to use when the request ends, one window per key across both endpoints."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest

from tailrace.engine.sim import SimServer

Start = Callable[..., Awaitable[SimServer]]
CLIENTS: list[Any] = []  # closed by the start_sim fixture


def charged(sim: SimServer) -> dict[str, float]:
    return {k: v["charged_tokens"] for k, v in sim.stats()["keys"].items()}


async def test_max_tokens_is_charged_at_admission_and_corrected_to_use_at_the_end(start_sim: Start) -> None:
    sim = await start_sim("tpm", tpm_limit=100_000)
    client = openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key="sk-shared", max_retries=0, timeout=10)
    CLIENTS.append(client)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello."}], max_tokens=4000
    )
    answer = raw.parse()
    assert answer.usage is not None
    # The header is written at admission: the whole max_tokens was taken then.
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) <= 100_000 - 4000
    [record] = sim.log_records()
    # ... and the window keeps only what was used once the request ended.
    assert charged(sim) == {record["key_hash"]: pytest.approx(answer.usage.prompt_tokens + record["output_tokens"])}
    assert answer.usage.completion_tokens == record["output_tokens"] < 4000


async def test_two_endpoints_on_one_key_share_one_window(start_sim: Start) -> None:
    sim = await start_sim("tpm", tpm_limit=100_000)
    oa = openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key="sk-shared", max_retries=0, timeout=10)
    an = anthropic.AsyncAnthropic(base_url=sim.anthropic_base_url, api_key="sk-shared", max_retries=0, timeout=10)
    other = openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key="sk-other", max_retries=0, timeout=10)
    CLIENTS.extend([oa, an, other])
    await oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi."}], max_tokens=50)
    await an.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=[{"role": "user", "content": "Hi."}])
    await other.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi."}], max_tokens=50
    )
    records = sim.log_records()
    by_key: dict[str, float] = {}
    for r in records:
        by_key[r["key_hash"]] = by_key.get(r["key_hash"], 0) + r["input_tokens"] + r["output_tokens"]
    assert len(by_key) == 2  # the shared key's two endpoints are one window; the other key its own
    assert charged(sim) == {k: pytest.approx(v) for k, v in by_key.items()}
