"""The web console: its pages and static files, signing in and out, and the middleware that
lets a signed-in browser use the gateway's own API.

The browser code (`broker_api/static/console/`) calls the same `/v1/admin/*`, `/v1/models` and
`/v1/chat/completions` routes as the CLI and the SDKs: `SessionMiddleware` authenticates a
request that carries the console's session cookie and no Authorization header by its session
(`broker_api.sessions`), demands the session's CSRF token on every state-changing method, and
hands the route the session's principal (`broker_api.sessions.signed_in`). So there is one
implementation of every operation, with the same scoping, validation, errors and audit trail,
and the console is a client of the documented API, not a second API.

Only signing in and out live here (`/console/api/session`). Pages are served with a strict
Content-Security-Policy (scripts and styles from this origin only, no inline code), and may
not be framed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from broker_api.auth import Principal
from broker_api.deps import Services, services
from broker_api.sessions import (
    COOKIE,
    CSRF_HEADER,
    SECURE_COOKIE,
    STATE_PRINCIPAL,
    STATE_SESSION,
    current_session,
    session_cookie,
    signed_in,
)
from schemas.console import ConsoleSession
from schemas.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RequestTooLargeError,
    TokenyardError,
)
from schemas.validation import parse_body

STATIC = Path(__file__).parent / "static"
PAGES = frozenset({"keys", "orgs", "nodes", "providers", "usage", "audit", "playground"})
SESSION_PATH = "/console/api/session"
GUARDED = ("/v1/", "/console/api/")  # where a session cookie stands in for a bearer key
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_SIGN_IN_BYTES = 4096
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

router = APIRouter()


# --- pages -----------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/console", status_code=302)


@router.get("/playground", include_in_schema=False)
async def playground() -> RedirectResponse:
    return RedirectResponse("/console/playground", status_code=302)


@router.get("/console", include_in_schema=False)
async def console_home() -> Response:
    return _page()


@router.get("/console/static/{path:path}", include_in_schema=False)
async def static_file(path: str) -> Response:
    root = STATIC.resolve()
    target = (root / path).resolve()
    media = MEDIA_TYPES.get(target.suffix)
    if media is None or not target.is_relative_to(root) or not target.is_file():
        raise NotFoundError(f"No console file '{path}'.")
    return FileResponse(target, media_type=media, headers={**SECURITY_HEADERS, "cache-control": "no-cache"})


@router.get("/console/{page}", include_in_schema=False)
async def console_page(page: str) -> Response:
    if page not in PAGES:
        raise NotFoundError(f"The console has no page '{page}'.")
    return _page()


def _page() -> Response:
    html = (STATIC / "console" / "index.html").read_bytes()
    return Response(html, media_type=MEDIA_TYPES[".html"], headers={**SECURITY_HEADERS, "cache-control": "no-store"})


# --- signing in and out ----------------------------------------------------------------


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1, max_length=512)


@router.post(SESSION_PATH, status_code=201)
async def sign_in(request: Request, s: Annotated[Services, Depends(services)]) -> JSONResponse:
    """Present an admin key once; answer with the session cookie and the CSRF token."""
    _same_origin(request)
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise InvalidRequestError('Sign in with a JSON body, {"key": "..."}.', code="invalid_content_type")
    body = parse_body(SignIn, await _small_json(request))
    done = await s.sessions.sign_in(body.key)
    s.auditor.record(done.principal, request, "console.signin", done.principal.key_id, done.principal.org)
    response = JSONResponse(_view(s, done.principal, done.record), status_code=201, headers=_no_store())
    secure = request.url.scheme == "https"
    response.set_cookie(
        SECURE_COOKIE if secure else COOKIE,
        done.session_id,
        max_age=int(s.sessions.lifetime),
        path="/",
        secure=secure,
        httponly=True,
        samesite="strict",
    )
    return response


@router.get(SESSION_PATH)
async def session_info(request: Request, s: Annotated[Services, Depends(services)]) -> JSONResponse:
    """Who is signed in, and the CSRF token (the page keeps it in memory only)."""
    who, record = _console_caller(request)
    return JSONResponse(_view(s, who, record), headers=_no_store())


@router.delete(SESSION_PATH)
async def sign_out(request: Request, s: Annotated[Services, Depends(services)]) -> JSONResponse:
    who, _ = _console_caller(request)
    session_id = session_cookie(request)
    if session_id:
        await s.sessions.sign_out(session_id)
    s.auditor.record(who, request, "console.signout", who.key_id, who.org)
    response = JSONResponse({"object": "console.session", "deleted": True}, headers=_no_store())
    _forget_cookie(response)
    return response


def _console_caller(request: Request) -> tuple[Principal, ConsoleSession]:
    who, record = signed_in(request), current_session(request)
    if who is None or record is None:
        raise AuthenticationError("You are not signed in to the console.", code="not_signed_in")
    return who, record


def _view(s: Services, who: Principal, record: ConsoleSession) -> dict[str, Any]:
    key = s.directory.key(who.key_id)
    org = s.directory.org(who.org)
    return {
        "object": "console.session",
        "csrf_token": record.csrf,
        "csrf_header": CSRF_HEADER,
        "key_id": who.key_id,
        "key_name": key.name if key else "Operator admin key",
        "org": {"id": who.org, "name": org.name if org else who.org},
        "operator": who.root,
        "idle_timeout": s.sessions.idle,
        "expires_at": record.created + s.sessions.lifetime,
    }


def _same_origin(request: Request) -> None:
    """No session exists yet, so no CSRF token: refuse a sign-in a foreign page started."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise PermissionDeniedError("Signing in from another site is refused.", code="cross_origin")
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise PermissionDeniedError("Signing in from another site is refused.", code="cross_origin")


async def _small_json(request: Request) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SIGN_IN_BYTES:
            raise RequestTooLargeError(f"A sign-in body is at most {MAX_SIGN_IN_BYTES} bytes.")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequestError("We could not parse the JSON body of your request.", code="invalid_json") from e


def _no_store() -> dict[str, str]:
    return {"cache-control": "no-store"}


def _forget_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    response.delete_cookie(SECURE_COOKIE, path="/", secure=True, httponly=True, samesite="strict")


# --- the session middleware ------------------------------------------------------------


class SessionMiddleware:
    """Authenticates requests to the API that carry a console session cookie and no
    Authorization header by their session, and refuses a state-changing one without the
    session's CSRF token (403) before any route sees it. A bearer key always wins over a
    cookie; requests without a cookie pass untouched (the chat hot path pays one scan of its
    headers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _carries_session(scope):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        session_id = session_cookie(request)
        if not session_id:
            await self.app(scope, receive, send)
            return
        try:
            who, record = await services(request).sessions.check(
                session_id, csrf=request.headers.get(CSRF_HEADER), unsafe=scope["method"] not in SAFE_METHODS
            )
        except TokenyardError as e:
            headers = {"retry-after": str(max(1, round(e.retry_after)))} if e.retry_after is not None else {}
            response = JSONResponse(e.body(), status_code=e.status, headers=headers)
            if e.status == 401:
                _forget_cookie(response)
            await response(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state[STATE_PRINCIPAL] = who
        state[STATE_SESSION] = record
        await self.app(scope, receive, send)


def _carries_session(scope: Scope) -> bool:
    """A guarded path with a cookie and no Authorization header (signing in is not guarded)."""
    path: str = scope["path"]
    if not path.startswith(GUARDED) or (path == SESSION_PATH and scope["method"] == "POST"):
        return False
    cookie = False
    for name, _ in scope["headers"]:
        if name == b"authorization":
            return False
        cookie = cookie or name == b"cookie"
    return cookie
