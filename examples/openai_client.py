"""Guided generation through the official `openai` client: the same prompt, the same seed, three weights.

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

prompt = [{"role": "user", "content": "My flight got cancelled and I'm stuck at the airport overnight."}]
for weight in (0.0, 0.25, 0.5):  # the `positive` ARM's recommended range is 0.1-0.5 (its card)
    reply = client.chat.completions.create(
        model=model.id,
        messages=prompt,
        max_tokens=48,
        temperature=0.7,
        seed=1,
        extra_body={"alignment": {"weights": {"positive": weight}}},
    )
    print(f"\npositive={weight} (served with {reply.model_extra['alignment']['weights']}):")
    print(reply.choices[0].message.content)
