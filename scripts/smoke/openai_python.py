#!/usr/bin/env python3
"""The official `openai` Python client against a running Tandem, unchanged.

usage: scripts/smoke/openai_python.py BASE_URL      (e.g. http://127.0.0.1:8000/v1)
Prints one line per check and a closing 'N passed, N failed' line; exits non-zero on failure.
"""
import sys
import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="unused")
results = []


def check(name, fn):
    try:
        fn()
        results.append(True)
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report and continue
        results.append(False)
        print(f"FAIL {name}: {e!r}")


model = client.models.list().data[0].id


def chat():
    # "What is the capital of France?" alone is a near tie for a 135M model at 4 bits: its first
    # greedy token is "L" (-1.94) over "The" (-2.04), and the answer wanders off.
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                                       temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def chat_stream():
    s = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16,
                                       seed=1, stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in s:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text and usage and usage.completion_tokens > 0


def completions():
    r = client.completions.create(model=model, prompt=["The capital of France is", "1, 2, 3,"], max_tokens=8, temperature=0)
    assert len(r.choices) == 2 and "Paris" in r.choices[0].text, r


def completions_echo_logprobs():
    r = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "The quick brown fox" and lp.token_logprobs[0] is None and len(lp.tokens) == r.usage.prompt_tokens


def bad_model():
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
        return
    raise AssertionError("expected a 404")


def bad_temperature():
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=5)
    except openai.BadRequestError as e:
        assert e.body["param"] == "temperature", e.body
        return
    raise AssertionError("expected a 400")


for name, fn in [("models + chat", chat), ("chat streaming with usage", chat_stream), ("completions, list of prompts", completions),
                 ("echo + logprobs + max_tokens 0", completions_echo_logprobs), ("unknown model is 404", bad_model),
                 ("temperature out of range is 400", bad_temperature)]:
    check(name, fn)
passed = sum(results)
print(f"openai-python: {passed} passed, {len(results) - passed} failed")
sys.exit(0 if passed == len(results) else 1)
