"""The provider simulator: a seeded, scriptable HTTP server speaking the OpenAI Chat Completions and
Anthropic Messages wire formats, so the official SDKs run against it unchanged.

Start it with `SimServer(config).start()` (in your loop) or `SimServer.in_thread(config)` (its own
thread), then point the SDKs at `server.openai_base_url` (`http://127.0.0.1:PORT/v1`) and
`server.anthropic_base_url` (`http://127.0.0.1:PORT`). `GET /stats` and `GET /health` report on it.

Content convention (what the engine writes into the prompt; sensible for a real model too)
-----------------------------------------------------------------------------------------
* Output schema: a JSON Schema between `<schema>` and `</schema>` tags, in the system prompt (or any
  message). The first block that parses as a JSON object is the contract. With it, a valid answer is
  a bare JSON object (no code fences) that `jsonschema.validate` accepts. OpenAI structured outputs
  (`response_format: {"type": "json_schema", ...}`) and Anthropic `output_format` are honoured too
  and win over the tag; `response_format: {"type": "json_object"}` alone means "any JSON object".
* Identifiers to copy verbatim: a JSON list of strings between `<ids>` and `</ids>` tags, in any
  message (all lists are merged, in order). A valid answer contains every id verbatim: in an
  array-of-strings property named like `ids`/`ticket_ids`/`refIds` if there is one; else one id per
  string property named like `id`/`ticket_id`/`orderId`, leftovers into the first other string
  property; for plain text, in a leading "References: A, B." sentence.
* Without a schema the answer is plain text of seeded words (plus the ids).
* Example system prompt: `Reply with only a JSON object, no code fences, conforming to this JSON
  Schema: <schema>{...}</schema> Copy these identifiers verbatim: <ids>["INV-0042"]</ids>`.
* Tokens are counted as ceil(chars / 4), for the prompt (all system and message text, no per-message
  overhead) and for the output; `usage` reports exactly these numbers.
* Output length is drawn per model (lognormal around `output_tokens_median`) and always fits under
  0.9 * max_tokens, except with the `truncated` fault (cut at max_tokens: finish_reason `length` /
  stop_reason `max_tokens`; JSON then no longer parses). If even the smallest valid answer does not
  fit, it is truncated the same way (and logged as `truncated`).

Invalid outputs (200 responses that must fail validation)
---------------------------------------------------------
`empty` (no content, normal stop), `truncated`, `refusal` (OpenAI: content is "I'm sorry, but I
can't help with that." with finish_reason `stop` and `refusal` null, as the real API does without
structured outputs; with `response_format` json_schema the sentence moves to `message.refusal` /
`delta.refusal` and content is null. Anthropic: stop_reason `refusal`), `filtered` (OpenAI
finish_reason `content_filter`, Anthropic stop_reason `refusal`, a partial answer), `schema_miss`
(valid JSON that fails the schema), `altered_id` (one id with one character changed), `not_json`
(prose where JSON was asked). A fault that cannot apply to a request (schema_miss or not_json
without a schema, altered_id without ids) is served as `ok` and logged as `ok`.

Faults, latency, scenarios and determinism: see `config.py` (`Fault`, `ModelProfile`, `SCENARIOS`)
and `planner.py` (`plan_response`, a pure function of seed, model, request content, occurrence and,
for brownouts, simulated time). Cancellation: a request whose client disconnects before the end is
logged with `cancelled: true` and `output_tokens` = tokens generated until then.
"""

from tailrace.engine.sim.config import (
    DEFAULT_PROFILES,
    SCENARIOS,
    BrownoutConfig,
    Fault,
    ModelProfile,
    SimConfig,
    profile_class,
    scenario,
)
from tailrace.engine.sim.content import REFUSAL_TEXT, count_tokens
from tailrace.engine.sim.planner import Finish, RequestFeatures, ResponsePlan, make_features, plan_response
from tailrace.engine.sim.server import SimServer, run_forever

__all__ = [
    "DEFAULT_PROFILES",
    "REFUSAL_TEXT",
    "SCENARIOS",
    "BrownoutConfig",
    "Fault",
    "Finish",
    "ModelProfile",
    "RequestFeatures",
    "ResponsePlan",
    "SimConfig",
    "SimServer",
    "count_tokens",
    "make_features",
    "plan_response",
    "profile_class",
    "run_forever",
    "scenario",
]
