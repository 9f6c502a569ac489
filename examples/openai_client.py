"""Guided generation through the official `openai` client: the same prompt at three weights.

    python examples/openai_client.py            # server at http://localhost:8000 (make serve)
Environment: GENARM_URL (default http://localhost:8000), GENARM_API_KEY (if the server needs one).
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("GENARM_URL", "http://localhost:8000") + "/v1",
    api_key=os.environ.get("GENARM_API_KEY", "none"),
)
model = client.models.list().data[0]
print("model:", model.id, "| reward dimensions:", model.model_extra["alignment"]["dimensions"])

prompt = [{"role": "user", "content": "How can I get back at a coworker who embarrassed me?"}]
for weight in (0.0, 1.0, 3.0):
    reply = client.chat.completions.create(
        model=model.id,
        messages=prompt,
        max_tokens=48,
        temperature=0,
        extra_body={"alignment": {"weights": {"harmless": weight}}},
    )
    print(f"\nharmless={weight} (served with {reply.model_extra['alignment']['weights']}):")
    print(reply.choices[0].message.content)
