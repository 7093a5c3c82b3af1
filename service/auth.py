"""Bearer-token auth: every configured token is valid (rotation), compared in constant time."""

from __future__ import annotations

import hmac

from service.errors import ApiError

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fraud-detection"'}


class Tokens:
    """The valid tokens (API_TOKEN, comma-separated, and API_TOKEN_FILE, one per line).

    Never logs or shows a token; `repr` says only how many there are.
    """

    def __init__(self, tokens: tuple[str, ...]):
        if not tokens:
            raise ValueError("no API token configured: set API_TOKEN (comma-separated for several) or "
                             "API_TOKEN_FILE (one token per line); `make run` creates one in .api_token")
        self._tokens = tuple(t.encode() for t in tokens)

    def __repr__(self) -> str:
        return f"Tokens({len(self._tokens)} configured)"

    def check(self, authorization: str | None) -> None:
        """Accept an `Authorization: Bearer <token>` header value.

        Raises:
            ApiError: unauthorized (missing header, another scheme, or an unknown token).
        """
        if not authorization:
            raise ApiError("unauthorized", "missing Authorization header; send 'Authorization: Bearer <token>'",
                           _CHALLENGE)
        scheme, _, given = authorization.partition(" ")
        # Exactly one space, and no whitespace around the token: a padded token is not the token.
        # (HTTP servers strip whitespace at the end of a header value before it gets here.)
        if scheme.lower() != "bearer" or not given or given != given.strip():
            raise ApiError("unauthorized", "the Authorization header must be 'Bearer <token>'", _CHALLENGE)
        # Headers arrive as latin-1 text; compare bytes so any character is a mismatch, not an error.
        candidate = given.encode("latin-1", errors="replace")
        # Compare against every token, without stopping at a match, so timing says nothing about which.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(candidate, token)
        if not matched:
            raise ApiError("unauthorized", "the Bearer token is not valid", _CHALLENGE)
