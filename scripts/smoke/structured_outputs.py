#!/usr/bin/env python3
"""Structured outputs with the official `openai` client against a running Tandem (the real
model): JSON Schema outputs for a varied set of schemas, greedy and sampled, streamed and not,
each parsed and validated with `jsonschema`; regex and choice outputs matched; tool calls
(`required`, a named function, streamed) validated against the function's parameters, and a
full round trip (call, `role: tool` result, answer).

usage: scripts/smoke/structured_outputs.py BASE_URL      (e.g. http://127.0.0.1:8000/v1)
Prints one line per check and a closing 'N passed, N failed' line; exits non-zero on failure.
"""
import json
import re
import sys

import jsonschema
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
model = client.models.list().data[0].id
results = []

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 30}},
        "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "city": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 16},
            "population": {"type": "integer", "minimum": 1, "maximum": 40000000}},
            "required": ["name", "population"], "additionalProperties": False},
        "country": {"type": "string", "maxLength": 16}},
        "required": ["city", "country"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]},
                   "minItems": 2, "maxItems": 4}},
        "required": ["colors"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {
        "temperature": {"type": "number", "minimum": -50, "maximum": 60},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["temperature", "rating"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {
        "answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000},
                             {"type": "string", "maxLength": 12}, {"type": "null"}]}},
        "required": ["answer"], "additionalProperties": False},
    "list_of_objects": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {
            "title": {"type": "string", "maxLength": 24},
            "done": {"type": "boolean"}},
        "required": ["title", "done"], "additionalProperties": False}},
}
PROMPTS = {
    "person": "Describe a fictional person as JSON.",
    "nested": "Give a city with its population and country as JSON.",
    "array_bounds": "List a few colors as JSON.",
    "numbers": "Give today's weather temperature and a rating as JSON.",
    "any_of": "What is 12 times 12? Answer as JSON.",
    "list_of_objects": "Write a short to-do list as JSON.",
}


def check(name, fn):
    try:
        fn()
        results.append(True)
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report and continue
        results.append(False)
        print(f"FAIL {name}: {e!r}")


def schema_case(name, temperature, seed, stream):
    def run():
        kw = dict(model=model, messages=[{"role": "user", "content": PROMPTS[name]}], max_tokens=200,
                  temperature=temperature, seed=seed,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": name, "strict": True, "schema": SCHEMAS[name]}})
        if stream:
            text, finish = "", None
            for c in client.chat.completions.create(stream=True, **kw):
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    finish = c.choices[0].finish_reason or finish
        else:
            r = client.chat.completions.create(**kw)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop", (finish, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    return run


def regex_and_choice():
    r = client.completions.create(model=model, prompt="A US phone number: ", max_tokens=20, temperature=0.8, seed=4,
                                  extra_body={"structured_outputs": {"regex": r"\(\d{3}\) \d{3}-\d{4}"}})
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.choices[0].text), r.choices[0].text
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                       max_tokens=8, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no"), r.choices[0].message.content


def json_object():
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Give a JSON object with one key."}],
                                       max_tokens=120, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def invalid_schema():
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}})
    except openai.BadRequestError as e:
        assert e.body["param"] == "response_format", e.body
        return
    raise AssertionError("expected a 400")


WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the current time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                                                     "required": ["city"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def tool_required():
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120,
                                           temperature=0.7, seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
        for call in c.message.tool_calls:
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), schema)


def tool_named_streamed():
    calls = {}
    for ch in client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=120, stream=True,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}}):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            d = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None, "deltas": 0})
            if tc.id:  # a call's first delta: its id, type and name
                assert d["id"] is None and tc.type == "function" and tc.function.name, tc
                d["id"] = tc.id
            d["name"] += tc.function.name or ""
            d["arguments"] += tc.function.arguments or ""
            d["deltas"] += 1
    assert list(calls) == [0] and calls[0]["name"] == "get_weather", calls
    assert calls[0]["id"].startswith("call_") and calls[0]["deltas"] > 2, calls  # arguments in fragments
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def tool_round_trip():
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=120, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    msgs = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    r2 = client.chat.completions.create(model=model, messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=40, temperature=0)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls, r2


for name in SCHEMAS:
    for temperature, seed, stream in [(0, None, False), (0.8, 11, False), (0.8, 12, True)]:
        check(f"json_schema {name} (t={temperature}, stream={stream})", schema_case(name, temperature, seed, stream))
check("regex and choice", regex_and_choice)
check("json_object", json_object)
check("an invalid schema is a 400", invalid_schema)
check("tool_choice required: calls valid under their parameters", tool_required)
check("a named tool call, streamed", tool_named_streamed)
check("a tool round trip: call, result, answer", tool_round_trip)
passed = sum(results)
print(f"structured outputs: {passed} passed, {len(results) - passed} failed")
sys.exit(0 if passed == len(results) else 1)
