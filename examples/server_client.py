"""Talk to a running applelm server with the official openai client.

    python -m applelm.server &          # embedded SmolLM2 on http://127.0.0.1:8080
    python examples/server_client.py "What is the capital of France?"
"""

import sys

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")  # any key unless --api-key was given
question = " ".join(sys.argv[1:]) or "What is the capital of France?"
stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": question}],
                                        max_tokens=64, temperature=0, stream=True)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
