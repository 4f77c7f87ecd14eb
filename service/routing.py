"""The /v1 routers' route class: a JSON body, sent as JSON, of a bounded size that holds Unicode text only, each
object's keys once.

Its size: the most texts a request may carry, at the most characters each, bounds every body these routes need; a
larger one is refused (413) as it arrives instead of being read into memory whole and parsed.

JSON's "\\ud800" escape decodes to a lone UTF-16 surrogate, a Python string that no UTF-8 encoder takes: a tokenizer,
SQLite, a file path or the JSON answer echoing it each failed with a 500 wherever it went next. Refused once, here,
with a 422 naming where in the body it is.

JSON readers keep the last of a key given twice, so `"epochs": 1, "epochs": 500` trained 500 epochs without a word
(the CLI refuses it in a YAML config); a body sent without `Content-Type: application/json` was validated as bytes
("Input should be a valid dictionary"), and one that is not UTF-8 got FastAPI's "There was an error parsing the body".
"""

from __future__ import annotations

import json
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
        if not hasattr(self, "_parsed"):
            try:  # a json.JSONDecodeError goes on to FastAPI, which answers 422 naming the character
                # Decoded here: json.loads of bytes also takes UTF-16 and UTF-32, which JSON over HTTP is not.
                self._parsed = json.loads((await self.body()).decode("utf-8-sig"), object_pairs_hook=_keys_once)
            except UnicodeDecodeError as e:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                    f"body: not UTF-8 (byte {e.start}); send JSON encoded as UTF-8") from None
            except RecursionError:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                    "body: values nested too deep to read; no request here needs more than a few "
                                    "levels") from None
            except ValueError as e:
                if isinstance(e, json.JSONDecodeError):
                    raise
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                    f"body: not readable as JSON ({e})") from None
            _refuse_lone_surrogates(self._parsed, "")
        return self._parsed


def _keys_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for key, value in pairs:
        if key in members:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"body: the key {key!r} is given more than once in one object; give it once")
        members[key] = value
    return members


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _too_large(settings: Settings, limit: int) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                         f"the request body is over {limit:,} bytes, the most {settings.max_batch_texts} texts "
                         f"(max_batch_texts) of {settings.max_text_chars} characters (max_text_chars) need")


class TextJsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            request = TextJsonRequest(request.scope, request.receive)
            content_type = request.headers.get("content-type")
            if self.body_field is not None and await request.body() and not _is_json(content_type):
                raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                                    f"send the body as JSON, with the header Content-Type: application/json (this "
                                    f"request's: {content_type or 'none'})")
            return await handler(request)

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
