"""``--auth-token-file``: the emulator answers only requests that carry its bearer token.

GCE refuses a request without valid credentials (401, Google's error shape,
a ``WWW-Authenticate`` challenge). The emulator runs whatever startup script
a request carries, so on a shared machine an open port is code execution for
every local user; with a token file, a request must carry
``Authorization: Bearer <the file's token>``. Only the REST API and the batch
endpoint are guarded: each VM's metadata server stays open to its guest, as
on GCE.
"""

import hmac
import logging
import os

from cflow.errors import CflowError
from cflow.local.compute import api_errors

logger = logging.getLogger(__name__)


class TokenFileError(CflowError):
    """The ``--auth-token-file`` cannot be used (missing, unreadable, empty)."""


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (surrounding whitespace removed).

    Raises:
        TokenFileError: the file is missing, unreadable or holds no token.
    """
    try:
        with open(path, encoding="utf-8") as token_file:
            token = token_file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise TokenFileError(f"--auth-token-file {path}: cannot read it ({error}); write a token into it or leave the option out") from None
    if not token or any(character.isspace() for character in token):
        example = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        raise TokenFileError(f"--auth-token-file {path} must hold one token (no spaces); make one with `{example} > {path}`")
    return token


class BearerTokenCheck:
    """Checks a request's ``Authorization`` header against the emulator's token.

    Args:
        token: the one accepted bearer token.
    """

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def refusal(self, authorization: str | None) -> api_errors.ApiError | None:
        """None if ``authorization`` is ``Bearer <token>``; else the 401 GCE answers (missing or invalid credentials)."""
        if not authorization or not authorization.strip():
            return api_errors.credentials_missing()
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return api_errors.credentials_invalid()
        # Constant time: the answer's timing tells nothing about how much of a guess was right.
        if not hmac.compare_digest(credential.strip().encode(), self._expected):
            logger.debug("refused a request with a wrong bearer token")
            return api_errors.credentials_invalid()
        return None
