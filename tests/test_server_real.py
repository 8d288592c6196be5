"""One short real-model check: the embedded SmolLM2 served with --dequantize answers sensibly, and four
concurrent greedy requests (different prompt lengths, one batch) get the tokens each gets alone."""

from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

from server_fixtures import ServerProcess

QUESTIONS = ["What is the capital of France?", "Name a color.",
             "Write one sentence about the ocean and the creatures that live in it.", "2+2="]


@pytest.mark.slow
def test_smollm2_batched_equals_alone():
    with ServerProcess(["--port", "0", "--dequantize"], timeout=300) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)

        def ask(q: str):
            r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": q}],
                                               max_tokens=20, temperature=0)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

        alone = [ask(q) for q in QUESTIONS]
        with cf.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, QUESTIONS))
    assert "Paris" in alone[0][0]
    assert together == alone
