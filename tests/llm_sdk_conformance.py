"""The real `openai` and `anthropic` Python SDKs against outrider (run by tests/llm.rs).

Each call is made twice through outrider's LLM routes: the first must be a cache MISS, the
second a HIT, and the SDK must parse both into the same objects, streamed and not. Prints one
JSON line per check; exits non-zero on the first difference.

Usage: python3 tests/llm_sdk_conformance.py BASE_URL
"""

import json
import sys

import anthropic
import openai

BASE = sys.argv[1].rstrip("/")
results = []


def twice(name, call):
    """Runs `call` twice; returns nothing, fails loudly unless MISS then HIT with equal objects."""
    seen = []
    for _ in range(2):
        raw = call()
        parsed = raw.parse()
        if hasattr(parsed, "__iter__") and not hasattr(parsed, "model_dump"):
            parsed = [event.model_dump() for event in parsed]
        else:
            parsed = parsed.model_dump()
        seen.append((raw.headers.get("x-cache-status"), parsed))
    statuses = [s for s, _ in seen]
    same = seen[0][1] == seen[1][1]
    results.append({"check": name, "cache": statuses, "same": same})
    print(json.dumps(results[-1]), flush=True)
    if statuses != ["MISS", "HIT"] or not same:
        print(json.dumps({"miss": seen[0][1], "hit": seen[1][1]}, default=str), file=sys.stderr)
        sys.exit(1)
    return seen[0][1]


oa = openai.OpenAI(base_url=BASE + "/v1", api_key="sk-sdk-conformance", max_retries=0)
messages = [{"role": "user", "content": "conformance check"}]


def chat(model, **options):
    """A raw chat-completions call of `model` on the conformance prompt, for `twice`."""
    return lambda: oa.chat.completions.with_raw_response.create(
        model=model, messages=messages, temperature=0, **options
    )


completion = twice("openai.chat", chat("gpt-4o-mini"))
assert completion["choices"][0]["message"]["content"].startswith("echo conformance check")
assert completion["usage"]["prompt_tokens"] == 11

chunks = twice("openai.chat.stream", chat("gpt-4o-mini", stream=True))
text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
assert text.startswith("echo conformance check"), text
# outrider asked for usage on the client's behalf; the client never sees that chunk.
assert all(c["choices"] for c in chunks), "no usage-only chunk"

USAGE = {"stream": True, "stream_options": {"include_usage": True}}
with_usage = twice("openai.chat.stream.include_usage", chat("gpt-4o-mini", **USAGE))
assert with_usage[-1]["usage"]["completion_tokens"] == 7

twice(
    "openai.embeddings",
    lambda: oa.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="conformance"
    ),
)

# Routed by a rule to an Anthropic upstream: the OpenAI SDK still parses OpenAI objects.
routed = twice("openai.chat.to_anthropic", chat("claude-auto"))
assert routed["model"] == "claude-x", routed
assert routed["choices"][0]["message"]["content"].startswith("echo conformance check")
assert routed["choices"][0]["finish_reason"] == "stop"
assert routed["usage"]["prompt_tokens"] == 12
routed_chunks = twice("openai.chat.stream.to_anthropic", chat("claude-auto", stream=True))
text = "".join(c["choices"][0]["delta"].get("content") or "" for c in routed_chunks)
assert text.startswith("echo conformance check"), text
assert routed_chunks[-1]["choices"][0]["finish_reason"] == "stop"
routed_usage = twice("openai.chat.stream.include_usage.to_anthropic", chat("claude-auto", **USAGE))
assert routed_usage[-1]["usage"]["completion_tokens"] == 6
try:
    oa.chat.completions.create(
        model="claude-auto", messages=messages, extra_headers={"x-fake": "429"}
    )
    sys.exit("expected a RateLimitError from the anthropic upstream")
except openai.RateLimitError as e:
    assert e.response.headers.get("retry-after") == "7"
    assert e.body["message"] == "slow down", e.body

an = anthropic.Anthropic(base_url=BASE, api_key="sk-ant-conformance", max_retries=0)
message = twice(
    "anthropic.messages",
    lambda: an.messages.with_raw_response.create(
        model="claude-x", max_tokens=64, messages=messages
    ),
)
assert message["content"][0]["text"].startswith("echo conformance check")
events = twice(
    "anthropic.messages.stream",
    lambda: an.messages.with_raw_response.create(
        model="claude-x", max_tokens=64, messages=messages, stream=True
    ),
)
assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"

# The SDK's high-level stream helper accumulates the same final message on a hit.
finals = []
for _ in range(2):
    with an.messages.stream(model="claude-x", max_tokens=64, messages=messages) as s:
        finals.append(s.get_final_message().model_dump())
assert finals[0] == finals[1]

# Routed by a rule to an OpenAI-compatible server: the Anthropic SDK still parses its objects.
local = twice(
    "anthropic.messages.to_openai",
    lambda: an.messages.with_raw_response.create(
        model="claude-local", max_tokens=64, messages=messages
    ),
)
assert local["model"] == "llama-3" and local["stop_reason"] == "end_turn", local
assert local["content"][0]["text"].startswith("echo conformance check")
assert local["usage"]["output_tokens"] == 7
local_events = twice(
    "anthropic.messages.stream.to_openai",
    lambda: an.messages.with_raw_response.create(
        model="claude-local", max_tokens=64, messages=messages, stream=True
    ),
)
assert local_events[0]["type"] == "message_start" and local_events[-1]["type"] == "message_stop"
local_finals = []
for _ in range(2):
    with an.messages.stream(model="claude-local", max_tokens=64, messages=messages) as s:
        local_finals.append(s.get_final_message().model_dump())
assert local_finals[0] == local_finals[1]
assert local_finals[0]["content"][0]["text"] == local["content"][0]["text"].replace("#1", "#2")
assert local_finals[0]["usage"]["output_tokens"] == 7

# Errors keep the SDK's exception types.
try:
    oa.chat.completions.create(model="gpt-4o-mini", messages=[], extra_headers={"x-fake": "429"})
    sys.exit("expected a RateLimitError")
except openai.RateLimitError as e:
    assert e.response.headers.get("retry-after") == "7"
try:
    oa.chat.completions.create(model="gpt-4o-mini", messages="not a list")
    sys.exit("expected a BadRequestError")
except openai.BadRequestError as e:
    assert e.body["code"] == "invalid_request", e.body
try:
    an.messages.create(model="claude-x", max_tokens=8, messages="nope")
    sys.exit("expected a BadRequestError")
except anthropic.BadRequestError as e:
    assert e.body["error"]["type"] == "invalid_request_error", e.body

print(json.dumps({"ok": len(results)}))
