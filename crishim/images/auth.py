"""Registry authentication: challenges, credentials and the token cache.

Registries answer 401 with a ``WWW-Authenticate`` challenge. ``Basic`` means: send the
username and password with every request. ``Bearer`` means: ask the token server named in
``realm`` for a token scoped to the repository (with the credentials, or anonymously),
then send that token. Tokens are reused until shortly before they expire.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass, field

# A token is renewed this long before the registry says it expires.
EXPIRY_MARGIN_SECONDS = 10.0
# Token servers that give no lifetime are assumed to grant this much (the spec's default).
DEFAULT_TOKEN_SECONDS = 60.0

_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


@dataclass(frozen=True)
class Credentials:
    """What a pull may authenticate with; all empty means anonymous."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    @classmethod
    def from_auth_field(cls, auth: str, **rest: str) -> Credentials:
        """Credentials from a docker config ``auth`` value (base64 of user:password)."""
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise ValueError("auth is not base64 of username:password") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise ValueError("auth is not base64 of username:password")
        return cls(username=username, password=password, **rest)

    @property
    def anonymous(self) -> bool:
        """True when nothing is set."""
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def basic_header(self) -> str:
        """The Basic Authorization header value."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def cache_key(self) -> str:
        """Identifies the principal (not the secret) for token caching."""
        return f"{self.username}|{bool(self.identity_token)}|{bool(self.registry_token)}"


@dataclass(frozen=True)
class Challenge:
    """One parsed WWW-Authenticate challenge."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate header into its challenges (scheme lower-cased)."""
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        scheme_match = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*").match(header, pos)
        if not scheme_match:
            break
        scheme = scheme_match.group(1).lower()
        pos = scheme_match.end()
        params: dict[str, str] = {}
        while True:
            param = _PARAM.match(header, pos)
            if not param:
                break
            value = param.group(2) if param.group(2) is not None else param.group(3)
            params[param.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = param.end()
            comma = re.compile(r"\s*,\s*").match(header, pos)
            if not comma:
                break
            pos = comma.end()
            # A token followed by something other than name=value starts the next challenge.
            if not _PARAM.match(header, pos):
                break
        challenges.append(Challenge(scheme, params))
    return challenges


@dataclass
class _Token:
    value: str
    expires_at: float


class TokenCache:
    """Bearer tokens by (realm, service, scope, principal), kept until near expiry."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str, str], _Token] = {}

    def get(self, key: tuple[str, str, str, str]) -> str | None:
        """A still-valid token for ``key``."""
        token = self._tokens.get(key)
        if token is None or token.expires_at - EXPIRY_MARGIN_SECONDS <= time.monotonic():
            return None
        return token.value

    def put(self, key: tuple[str, str, str, str], value: str, lifetime: float) -> None:
        """Remember a token for ``lifetime`` seconds."""
        self._tokens[key] = _Token(value, time.monotonic() + lifetime)
