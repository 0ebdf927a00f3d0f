"""The admin token: read from the environment once per runtime, by the admin API and explain."""

from __future__ import annotations

import os

TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"

MIN_TOKEN_CHARS = 16
"""The shortest admin token accepted: a shorter one could be guessed over the network."""


def token_from_env() -> str | None:
    """Return the admin token without surrounding whitespace (a secret mounted from a file ends
    with a newline), or None when admin is disabled (unset or blank).

    Raises `ValueError` (the gateway does not start) when the token is shorter than
    `MIN_TOKEN_CHARS`: an admin that looks protected and is not is worse than none.
    """
    token = (os.environ.get(TOKEN_ENV) or "").strip() or None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"{TOKEN_ENV} is {len(token)} characters long; it must have at least "
            f"{MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 24`), or be unset to disable the admin API"
        )
    return token
