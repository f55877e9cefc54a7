#!/usr/bin/env python3
"""Check a Tessera server with the official OpenAI Python client.

Usage: scripts/openai-client-check.py BASE_URL [MODEL]
  BASE_URL  for example http://127.0.0.1:8000/v1
  MODEL     the served model name (default: the first one /v1/models lists)

Needs the `openai` package (pip install openai). Lists the models, asks "What is the capital of
France?" greedily (plain and streamed, the stream with usage), checks that both answers mention
Paris and are equal, runs a text completion, and checks that an unknown model is a 404 the
client raises as NotFoundError. Exits non-zero on the first failure.
"""

import sys

import openai


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    base = sys.argv[1].rstrip("/")
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
    models = [m.id for m in client.models.list().data]
    assert models, "no models listed"
    model = sys.argv[2] if len(sys.argv) > 2 else models[0]
    assert model in models, f"{model} not in {models}"
    print(f"models: {models}")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0
    )
    text = r.choices[0].message.content
    print(f"chat: {text!r} finish_reason={r.choices[0].finish_reason} usage={r.usage}")
    assert "Paris" in text, text
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, chunks = [], None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
    streamed = "".join(pieces)
    print(f"stream: {chunks} chunks, {len(pieces)} with text: {streamed!r} usage={usage}")
    assert streamed == text, (streamed, text)
    assert len(pieces) >= 2
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    print(f"completion: {c.choices[0].text!r}")
    assert c.choices[0].text

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        print(f"unknown model: {e.status_code} {e.body}")
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=-1)
        raise AssertionError("max_tokens=-1 was accepted")
    except openai.BadRequestError as e:
        print(f"bad max_tokens: {e.status_code} {e.body}")

    print("OK: the OpenAI client works against", base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
