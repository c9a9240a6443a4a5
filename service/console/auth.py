"""Who may use the console: one shared secret, ``PANDASYNC_ADMIN_TOKEN``.

The login form posts the token; it is compared in constant time and, when it matches, the
console sets a session cookie: ``{"csrf": <random>}`` signed with itsdangerous under a key
derived from the admin token (rotating the token signs every session out), HttpOnly,
SameSite=Strict, Secure when the request came over https, scoped to ``/console`` so the
webhook path never sees it, and valid for SESSION_MAX_AGE_S.

Every form that changes something carries the session's CSRF token, checked here before the
handler runs; the login form, which has no session yet, carries one bound to a short-lived
signed cookie of its own. A request whose ``Origin`` names another site is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from service.pandapon.signer import constant_time_equal

SESSION_COOKIE = "pandasync_console"
LOGIN_COOKIE = "pandasync_console_login"
COOKIE_PATH = "/console"
SESSION_MAX_AGE_S = 12 * 3600
LOGIN_MAX_AGE_S = 3600
# A console form is a few fields; anything bigger is not one of ours.
MAX_FORM_BYTES = 16 * 1024
# Shorter tokens are guessable; the console stays off rather than run behind one.
MIN_TOKEN_CHARS = 16


class FormTooLarge(Exception):
    """The request body is larger than any console form."""


@dataclass(frozen=True, slots=True)
class Session:
    csrf: str


class Keys:
    """The signers of the session and login cookies, keyed by the admin token."""

    def __init__(self, admin_token: str) -> None:
        self._token = admin_token
        key = hmac.new(admin_token.encode(), b"pandasync console cookies v1", hashlib.sha256)
        secret = key.hexdigest()
        self._session = URLSafeTimedSerializer(secret, salt="pandasync.console.session")
        self._login = URLSafeTimedSerializer(secret, salt="pandasync.console.login")

    def token_matches(self, offered: str) -> bool:
        return constant_time_equal(offered, self._token)

    def new_session(self) -> tuple[Session, str]:
        session = Session(csrf=secrets.token_urlsafe(32))
        return session, self._session.dumps({"csrf": session.csrf})

    def session_of(self, request: Request) -> Session | None:
        """The request's valid session, or None (no cookie, a forged or expired one)."""
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            return None
        try:
            data = self._session.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadSignature:  # SignatureExpired is one too
            return None
        csrf = data.get("csrf") if isinstance(data, dict) else None
        return Session(csrf) if isinstance(csrf, str) and csrf else None

    def new_login(self) -> tuple[str, str]:
        """A CSRF token for the login form, and the signed cookie that vouches for it."""
        nonce = secrets.token_urlsafe(32)
        return nonce, self._login.dumps(nonce)

    def login_nonce_of(self, request: Request) -> str | None:
        cookie = request.cookies.get(LOGIN_COOKIE)
        if not cookie:
            return None
        try:
            nonce = self._login.loads(cookie, max_age=LOGIN_MAX_AGE_S)
        except BadSignature:
            return None
        return nonce if isinstance(nonce, str) and nonce else None


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(
        name,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as {name: first value}; another type of
    body reads as an empty form (so its CSRF check fails)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormTooLarge
    if media != "application/x-www-form-urlencoded":
        return {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    parsed = parse_qs(text, keep_blank_values=True, max_num_fields=64)
    return {name: values[0] for name, values in parsed.items()}


def same_origin(request: Request) -> bool:
    """False when the browser says the request came from a page of another origin. A request
    without ``Origin`` (an older browser, a script) passes: the CSRF token still guards it."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"{request.url.scheme}://{host}", f"http://{host}", f"https://{host}")


def csrf_valid(session: Session, form: dict[str, str]) -> bool:
    offered = form.get("csrf", "")
    return bool(offered) and constant_time_equal(offered, session.csrf)


def local_target(value: str | None) -> str:
    """Where to go after logging in: a console path, never another site."""
    if value and value.startswith("/console/") and "//" not in value and "\\" not in value:
        return value
    return "/console/"
