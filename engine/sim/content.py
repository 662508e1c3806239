"""What the simulated model writes: parse the output contract from the prompt, generate answers.

The contract travels in the prompt (see the package docstring): a JSON Schema between `<schema>`
tags and identifiers to copy verbatim as a JSON list between `<ids>` tags. `valid_answer` writes an
answer that meets it; the `*_answer` helpers write the invalid kinds that must fail validation.
"""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

import jsonschema

SCHEMA_RE = re.compile(r"<schema>(.*?)</schema>", re.DOTALL)
IDS_RE = re.compile(r"<ids>(.*?)</ids>", re.DOTALL)

REFUSAL_TEXT = "I'm sorry, but I can't help with that."

_WORD_TEXT = (
    "account adjust agent alpha amber anchor answer april archive audit balance basket beacon bridge "
    "budget cable canvas carbon case channel charter check cipher claim cobalt comet credit crystal "
    "customer cycle delta delivery desk detail device draft echo engine estimate event falcon field "
    "filter focus forest frame garden gateway glacier harbor header horizon invoice island journal "
    "kernel ledger lemon level limit linear lotus margin marble matrix meadow metric mirror module "
    "monday needle notice number ocean office orbit order packet panel parcel pattern pepper pilot "
    "planet policy portal prism profile quartz query radius record refund region report request "
    "review river route sample schedule sector signal silver solar status summary system tenant "
    "ticket timber token topic tower update valley vector velvet window winter yellow zenith"
)
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: about four characters per token, for prompts and outputs alike."""
    return math.ceil(len(text) / 4)


def parse_contract(texts: list[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """The schema (first parseable `<schema>` block) and ids (all `<ids>` lists, in order, deduped)."""
    schema: dict[str, Any] | None = None
    ids: list[str] = []
    for text in texts:
        if schema is None:
            for m in SCHEMA_RE.finditer(text):
                try:
                    value = json.loads(m.group(1))
                except ValueError:
                    continue
                if isinstance(value, dict):
                    schema = value
                    break
        for m in IDS_RE.finditer(text):
            try:
                value = json.loads(m.group(1))
            except ValueError:
                continue
            if isinstance(value, list):
                ids.extend(str(v) for v in value if str(v) not in ids)
    return schema, ids


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def prose(rng: random.Random, n_chars: int) -> str:
    """Sentences of seeded words, about `n_chars` long (never longer than max(n_chars, one word))."""
    out: list[str] = []
    size = 0
    while size < n_chars:
        sentence = words(rng, rng.randint(6, 14)).capitalize() + ". "
        out.append(sentence)
        size += len(sentence)
    text = "".join(out).strip()
    if len(text) > n_chars:
        cut = text.rfind(" ", 0, n_chars)
        text = text[: cut if cut > 0 else n_chars].rstrip(" .") + "."
    return text


def text_answer(rng: random.Random, ids: list[str], n_chars: int) -> str:
    """Plain text of about `n_chars` with every id verbatim."""
    ref = ("References: " + ", ".join(ids) + ". ") if ids else ""
    return ref + prose(rng, max(10, n_chars - len(ref)))


# ---- schema-driven JSON -------------------------------------------------------------------------


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow local `$ref`s and pick the first non-null branch of anyOf/oneOf (pydantic output)."""
    for _ in range(32):
        if "$ref" in schema and isinstance(schema["$ref"], str) and schema["$ref"].startswith("#/"):
            node: Any = root
            for part in schema["$ref"][2:].split("/"):
                node = node.get(part, {}) if isinstance(node, dict) else {}
            schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **node}
            continue
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                non_null = [b for b in branches if isinstance(b, dict) and b.get("type") != "null"]
                rest = {k: v for k, v in schema.items() if k != key}
                schema = {**rest, **(non_null or branches)[0]}
                break
        else:
            if isinstance(schema.get("allOf"), list):
                merged = {k: v for k, v in schema.items() if k != "allOf"}
                for b in schema["allOf"]:
                    merged.update(b)
                schema = merged
                continue
            return schema
    return schema


def _type(schema: dict[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    if t is None and "properties" in schema:
        return "object"
    return t


class _Builder:
    """Builds a minimal conforming value, remembering where ids and padding can go."""

    def __init__(self, rng: random.Random, root: dict[str, Any]) -> None:
        self.rng = rng
        self.root = root
        # (container, key, property name, schema) of every free string, in document order.
        self.strings: list[tuple[Any, Any, str, dict[str, Any]]] = []
        # (container, key, property name, schema) of every array-of-strings property.
        self.string_arrays: list[tuple[Any, Any, str, dict[str, Any]]] = []

    def build(self, schema: dict[str, Any], name: str = "", depth: int = 0) -> Any:
        schema = _resolve(schema, self.root)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self.rng.choice(schema["enum"])
        t = _type(schema)
        if t == "object" or (t is None and depth == 0):
            return self._object(schema, depth)
        if t == "array":
            return self._array(schema, name, depth)
        if t in ("integer", "number"):
            step = 1 if t == "integer" else 0.01
            lo = schema.get("minimum", schema.get("exclusiveMinimum", -step) + step)
            hi = schema.get("maximum", schema.get("exclusiveMaximum", lo + 100 + step) - step)
            if t == "integer":
                return self.rng.randint(int(lo), max(int(lo), int(hi)))
            return round(self.rng.uniform(float(lo), max(float(lo), float(hi))), 2)
        if t == "boolean":
            return self.rng.random() < 0.5
        if t == "null":
            return None
        return words(self.rng, 3)[: int(schema.get("maxLength", 10**9))].ljust(int(schema.get("minLength", 0)), "x")

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        props: dict[str, Any] = schema.get("properties") or {}
        if not props and depth == 0:
            props = {"answer": {"type": "string"}}  # a bare "JSON object" contract
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if not isinstance(sub, dict):
                continue
            out[name] = self.build(sub, name, depth + 1)
            self._note(out, name, name, sub)
        return out

    def _array(self, schema: dict[str, Any], name: str, depth: int) -> list[Any]:
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {"type": "string"}
        n = max(int(schema.get("minItems", 1)), 1)
        n = min(n, int(schema.get("maxItems", n)))
        out = [self.build(items, name, depth + 1) for _ in range(n)]
        for i in range(len(out)):
            self._note(out, i, name, items)
        return out

    def _note(self, container: Any, key: Any, name: str, schema: dict[str, Any]) -> None:
        schema = _resolve(schema, self.root)
        if "enum" in schema or "const" in schema or "pattern" in schema or "format" in schema:
            return  # constrained strings are never rewritten
        t = _type(schema)
        if t == "string":
            self.strings.append((container, key, name, schema))
        elif t == "array":
            items = _resolve(schema.get("items") or {"type": "string"}, self.root)
            if _type(items) == "string" and "enum" not in items and isinstance(key, str):
                self.string_arrays.append((container, key, name, schema))


_ID_NAME_RE = re.compile(r"(^(id|ids|ID|IDs)$)|([_-](id|ids|ID|IDs)$)|([a-z0-9](Id|Ids|ID|IDs)$)")


def _is_id_name(name: str) -> bool:
    """`ticket_id`, `refIds`, `id`: yes; `paid`, `valid`: no."""
    return bool(_ID_NAME_RE.search(name))


def _place_ids(b: _Builder, ids: list[str]) -> set[int]:
    """Put the ids into the value; returns the indexes in `b.strings` now holding ids."""
    used: set[int] = set()
    if not ids:
        return used
    for container, key, name, schema in b.string_arrays:
        if _is_id_name(name) and schema.get("maxItems", len(ids)) >= len(ids):
            old = container[key]
            container[key] = list(ids)
            # The array's old item slots are gone: they are no longer strings to pad.
            b.strings = [s for s in b.strings if s[0] is not old]
            return used
    id_slots = [i for i, s in enumerate(b.strings) if _is_id_name(s[2]) and not isinstance(s[1], int)]
    free = [i for i in range(len(b.strings)) if i not in id_slots]
    remaining = list(ids)
    for i in id_slots:
        if not remaining:
            break
        container, key, _, _ = b.strings[i]
        container[key] = remaining.pop(0)
        used.add(i)
    if remaining:
        target = free[0] if free else (id_slots[-1] if id_slots else None)
        if target is not None:
            container, key, _, _ = b.strings[target]
            prefix = "" if target in used else f"{container[key]} "
            container[key] = (prefix + "ref " + ", ".join(remaining)).strip()
            used.add(target)
    return used


def valid_answer(rng: random.Random, schema: dict[str, Any], ids: list[str], n_chars: int) -> str:
    """Compact JSON conforming to `schema`, ids placed verbatim, padded to about `n_chars`."""
    b = _Builder(rng, schema)
    value = b.build(schema)
    used = _place_ids(b, ids)
    pad = [s for i, s in enumerate(b.strings) if i not in used]
    text = json.dumps(value, ensure_ascii=False)
    short = n_chars - len(text)
    if short > 0 and pad:
        share = short // len(pad)
        for container, key, _, sub in pad:
            limit = int(sub.get("maxLength", 10**9))
            current = str(container[key])
            room = min(limit - len(current) - 1, share)
            if room > 8:
                container[key] = f"{current} {prose(rng, room)}"
        text = json.dumps(value, ensure_ascii=False)
    return text


def schema_miss_answer(rng: random.Random, schema: dict[str, Any], ids: list[str], n_chars: int) -> str:
    """Valid JSON that fails `schema`: a required property dropped, else a property of the wrong type."""
    value = json.loads(valid_answer(rng, schema, ids, n_chars))
    root = _resolve(schema, schema)
    candidates: list[Any] = []
    if isinstance(value, dict):
        required = [r for r in root.get("required", []) if r in value]
        candidates += [("drop", r) for r in required]
        candidates += [("retype", k) for k in value]
    for how, key in candidates:
        trial = dict(value)
        if how == "drop":
            del trial[key]
        else:
            # A list is wrong for every scalar type; a string is wrong for lists and objects.
            trial[key] = "n/a" if isinstance(trial[key], list | dict) else [trial[key]]
        if not _conforms(trial, schema):
            return json.dumps(trial, ensure_ascii=False)
    # Not an object, or nothing broke it: a top-level value of the wrong type.
    wrong: Any = {"value": value} if not isinstance(value, dict) else [value]
    return json.dumps(wrong, ensure_ascii=False)


def _conforms(value: Any, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    except jsonschema.SchemaError:
        return True  # an unusable schema cannot judge anything
    return True


def alter_id(rng: random.Random, text: str, ids: list[str]) -> str | None:
    """`text` with one id changed by one character everywhere it occurs; None when impossible."""
    # An id inside another id cannot be altered without leaving it verbatim in the other.
    candidates = [i for i in ids if i and i in text and not any(i != o and i in o for o in ids)]
    if not candidates:
        return None
    target = rng.choice(candidates)
    pos = rng.randrange(len(target))
    ch = target[pos]
    if ch.isdigit():
        pool = "0123456789"
    elif ch.isupper():
        pool = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    elif ch.islower():
        pool = "abcdefghijklmnopqrstuvwxyz"
    else:
        pool = "-_.:/"
    new = rng.choice([c for c in pool if c != ch] or ["x"])
    altered = target[:pos] + new + target[pos + 1 :]
    return text.replace(target, altered)


def not_json_answer(rng: random.Random, ids: list[str], n_chars: int) -> str:
    """Chatty prose where a JSON object was asked, ids included so only the format is wrong."""
    return "Sure! Here is what I found. " + text_answer(rng, ids, max(40, n_chars - 28))


def truncate(text: str, max_tokens: int) -> str:
    """Cut at the token limit, as a provider does when finish_reason is length."""
    return text[: max(0, max_tokens) * 4]
