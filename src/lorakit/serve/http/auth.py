"""The API key: with one set, every route but the playground page and /health needs
`Authorization: Bearer KEY` (compared in constant time); without one, the server is open (it binds to
127.0.0.1 unless told otherwise)."""
from __future__ import annotations

import hmac
import json

from lorakit.serve.http.errors import error_body

OPEN_PATHS = frozenset({"/", "/health"})


class APIKeyMiddleware:
    """ASGI middleware answering 401 in OpenAI's shape to requests without the key."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", ())).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        what = "no API key was given" if not given else "the API key is wrong"
        body = error_body(401, f"{what}: send the server's key as 'Authorization: Bearer KEY' (the --api-key "
                               "it was started with; the openai client's api_key).", code="invalid_api_key")
        await send_json(send, 401, body, {"www-authenticate": "Bearer"})


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    """Send a whole JSON response from ASGI middleware."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
