#!/usr/bin/env python3
"""Structured outputs with the official `openai` client against a running Tandem (the real
model): JSON Schema outputs for a varied set of schemas, greedy and sampled, streamed and not,
each parsed and validated with `jsonschema`; regex and choice outputs matched; `logit_bias`.

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


for name in SCHEMAS:
    for temperature, seed, stream in [(0, None, False), (0.8, 11, False), (0.8, 12, True)]:
        check(f"json_schema {name} (t={temperature}, stream={stream})", schema_case(name, temperature, seed, stream))
check("regex and choice", regex_and_choice)
check("json_object", json_object)
check("an invalid schema is a 400", invalid_schema)
passed = sum(results)
print(f"structured outputs: {passed} passed, {len(results) - passed} failed")
sys.exit(0 if passed == len(results) else 1)
