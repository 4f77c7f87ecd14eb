"""/ui: one HTML page over the API (jobs, models, trying a model, comparisons), for people; it holds no data itself,
so it needs no API key: its script sends the key the user types with every API call."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

router = APIRouter(include_in_schema=False)
PAGE = Path(__file__).parent.parent / "static" / "ui.html"


@router.get("/ui", response_class=HTMLResponse)
async def ui() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui")
