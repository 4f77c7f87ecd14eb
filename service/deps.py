"""Dependencies of the routes: what lifespan put on app.state, and the API key check.

They are `async def` although they never await: FastAPI runs a plain `def` dependency in a worker thread, and those
hops cost a /predict request about 0.2 ms (bench/serve.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.runner import Runner
from service.settings import Settings
from service.store import Store


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_runner(request: Request) -> Runner:
    return request.app.state.runner


async def get_stopping(request: Request) -> Callable[[], bool]:
    return request.app.state.stopping


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
StoppingDep = Annotated[Callable[[], bool], Depends(get_stopping)]  # true once the server has been told to stop

# auto_error=False: a missing header is answered by require_api_key (401 with our message), not HTTPBearer's 403.
_bearer = HTTPBearer(auto_error=False, description="The server's DISTILL_API_KEY, when it has one.")


async def require_api_key(settings: SettingsDep, request: Request,
                          credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """When settings.api_key is set, the routes it guards (every /v1 route, /readyz, /metrics) need
    `Authorization: Bearer <key>`; /healthz, the page /ui and the API's own docs (/docs, /openapi.json) are open."""
    if settings.api_key is None:
        return
    if credentials is None:
        # Its value is not echoed: without a scheme, it is the key.
        message = ("the Authorization header is not 'Bearer <key>'; send the key after the word Bearer"
                   if request.headers.get("authorization", "").strip() else
                   "missing API key: send the header 'Authorization: Bearer <key>'")
    elif not secrets.compare_digest(credentials.credentials.encode(), settings.api_key.encode()):
        message = "invalid API key: the bearer token does not match the server's DISTILL_API_KEY"
    else:
        return
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})
