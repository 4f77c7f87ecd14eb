"""The /v1 routers' route class: a JSON body holds Unicode text only.

JSON's "\\ud800" escape decodes to a lone UTF-16 surrogate, a Python string that no UTF-8 encoder takes: a tokenizer,
SQLite, a file path or the JSON answer echoing it each failed with a 500 wherever it went next. Refused once, here,
with a 422 naming where in the body it is.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response, status
from fastapi.routing import APIRoute


class TextJsonRequest(Request):
    async def json(self) -> Any:
        body = await super().json()
        _refuse_lone_surrogates(body, "")
        return body


class TextJsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(TextJsonRequest(request.scope, request.receive))

        return handle


def _refuse_lone_surrogates(value: Any, where: str) -> None:
    """HTTPException 422 for the first string in `value` (a decoded JSON body) that is not Unicode text; `where`
    names the field as the other messages do: `texts[1]`, `data.dataset`."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"{where or 'the body'} holds a lone surrogate (\\u{ord(value[e.start]):x}) at "
                                f"character {e.start}; send Unicode text") from None
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, f"a key of {where or 'the body'}")
            _refuse_lone_surrogates(item, f"{where}.{key}" if where else key)
