"""The /v1 routers' route class: a JSON body of a bounded size that holds Unicode text only.

Its size: the most texts a request may carry, at the most characters each, bounds every body these routes need; a
larger one is refused (413) as it arrives instead of being read into memory whole and parsed.

JSON's "\\ud800" escape decodes to a lone UTF-16 surrogate, a Python string that no UTF-8 encoder takes: a tokenizer,
SQLite, a file path or the JSON answer echoing it each failed with a 500 wherever it went next. Refused once, here,
with a 422 naming where in the body it is.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response, status
from fastapi.routing import APIRoute

from service.settings import Settings

# The longest a JSON character gets: an astral one written as two \\uXXXX escapes. The rest: keys, labels, a job config.
_BYTES_PER_CHAR, _BODY_OVERHEAD_BYTES = 12, 1024 * 1024


def json_body_limit(settings: Settings) -> int:
    """The most bytes a /v1 JSON body may have: max_batch_texts texts of max_text_chars characters, and room."""
    return settings.max_batch_texts * settings.max_text_chars * _BYTES_PER_CHAR + _BODY_OVERHEAD_BYTES


class TextJsonRequest(Request):
    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            settings: Settings = self.app.state.settings
            limit = json_body_limit(settings)
            declared = self.headers.get("content-length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > limit:
                raise _too_large(settings, limit)
            received = bytearray()
            async for chunk in self.stream():  # a chunked body says its size only as it arrives
                received += chunk
                if len(received) > limit:
                    raise _too_large(settings, limit)
            self._body = bytes(received)
        return self._body

    async def json(self) -> Any:
        body = await super().json()
        _refuse_lone_surrogates(body, "")
        return body


def _too_large(settings: Settings, limit: int) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                         f"the request body is over {limit:,} bytes, the most {settings.max_batch_texts} texts "
                         f"(max_batch_texts) of {settings.max_text_chars} characters (max_text_chars) need")


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
