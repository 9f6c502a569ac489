"""The playground page at `/`: plain HTML + JS, no build step, served by the running server.

It talks to the same OpenAI API as any client (`/v1/models` for the reward dimensions, streaming
`/v1/chat/completions` twice: once with `{"weights": {}}` for the base alone, once with the
slider weights, both with the same seed and temperature so that any difference comes from
guidance alone), so it works wherever the API works, API keys included. When both streams end,
the page diffs them token by token (one streamed content delta = one token; longest common
subsequence) and marks the guided tokens that depart from the base answer.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("static") / "playground.html"

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
