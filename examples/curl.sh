#!/usr/bin/env bash
# Guided generation with curl. Server: make serve (http://localhost:8000).
# Environment: GENARM_URL, GENARM_API_KEY (if the server needs one).
set -euo pipefail
url="${GENARM_URL:-http://localhost:8000}"
auth=(-H "Authorization: Bearer ${GENARM_API_KEY:-none}")
model=$(curl -sf "${auth[@]}" "$url/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
curl -sf "${auth[@]}" "$url/v1/chat/completions" -H "Content-Type: application/json" -d @- <<JSON
{
  "model": "$model",
  "messages": [{"role": "user", "content": "My flight got cancelled and I'm stuck at the airport overnight."}],
  "max_tokens": 48,
  "temperature": 0.7,
  "seed": 1,
  "alignment": {"weights": {"positive": 0.5, "objective": 0.0}}
}
JSON
echo
