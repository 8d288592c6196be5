"""The server through the official `openai` client on loopback: chat and completions, streaming or not,
stop, max_tokens / length, usage, seeds, and concurrent requests sharing the batch."""

from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.request

import openai
import pytest

from server_fixtures import FakeTokenizer, live_server, tiny_engine

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server():
    with live_server(tiny_engine(max_batch=8)) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, **kw):
    kw.setdefault("messages", MSGS)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", **kw)


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
                   for c in chunks if c.choices)
    return text, chunks


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert client.models.retrieve("default").id == "tiny"


def test_chat_usage_and_length(client):
    r = chat(client, max_tokens=9, extra_body={"ignore_eos": True})
    prompt = FakeTokenizer().apply_chat_template(MSGS)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert len(r.choices[0].message.content) == 9  # one character per token
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt) - 2, 9,
                                                                                        len(prompt) - 2 + 9)
    r2 = chat(client, max_completion_tokens=4, extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 4 and r2.choices[0].message.content == r.choices[0].message.content[:4]


def test_chat_stream_equals_non_stream(client):
    whole = chat(client, max_tokens=20)
    text, chunks = stream_text(chat(client, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert chunks[-1].choices == [] and all(getattr(chunks[-1].usage, k) == getattr(whole.usage, k) for k in counts)
    # the same prompt again: all but its last token come from the prompt cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1
    assert len({c.id for c in chunks}) == 1
    text2, chunks2 = stream_text(chat(client, max_tokens=20, stream=True))
    assert text2 == text and all(c.usage is None for c in chunks2)


def test_completions(client):
    r = client.completions.create(model="default", prompt="once upon", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].text) == 6
    assert r.usage.prompt_tokens == len(FakeTokenizer().encode("once upon"))
    text, chunks = stream_text(client.completions.create(model="tiny", prompt="once upon", max_tokens=6,
                                                         temperature=0, stream=True,
                                                         extra_body={"ignore_eos": True}))
    assert text == r.choices[0].text and chunks[-1].choices[0].finish_reason == "length"
    by_ids = client.completions.create(model="tiny", prompt=FakeTokenizer().encode("once upon"), max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text


@pytest.mark.parametrize("as_list", [False, True])
def test_stop(client, as_list):
    full = chat(client, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[4:7]
    cut = full.find(stop)
    r = chat(client, max_tokens=24, stop=["@@@", stop] if as_list else stop)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == full[:cut]
    text, chunks = stream_text(chat(client, max_tokens=24, stop=stop, stream=True))
    assert text == full[:cut] and chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=16, extra_body={"ignore_eos": True})
    a = chat(client, seed=7, **kw).choices[0].message.content
    b = chat(client, seed=7, **kw).choices[0].message.content
    c = chat(client, seed=8, **kw).choices[0].message.content
    s, _ = stream_text(chat(client, seed=7, stream=True, **kw))
    assert a == b == s and a != c


def test_concurrent_requests_share_the_batch(server, client):
    prompts = ["a", "bb bb", "the longest prompt of the four, by far", "dd"]

    def one(p):
        return chat(client, messages=[{"role": "user", "content": p}], max_tokens=24).choices[0].message.content

    alone = [one(p) for p in prompts]
    app = server[1]
    app.engine.max_active_seen = 0
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, prompts * 2))
    assert together == alone * 2
    assert app.engine.max_active_seen > 1


def test_health_and_openapi(server):
    url = server[0]
    health = json.load(urllib.request.urlopen(url + "/health"))
    assert health["status"] == "ok" and health["model"] == "tiny"
    doc = json.load(urllib.request.urlopen(url + "/openapi.json"))
    assert doc["openapi"].startswith("3.") and "/v1/chat/completions" in doc["paths"]
    assert doc["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == ["tiny", "default", None]
