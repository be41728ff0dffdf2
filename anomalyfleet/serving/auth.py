"""Bearer tokens per client or per line.

A token is configured as plain text, as its SHA-256 (so a registry in shared storage need not hold
secrets), or as the name of an environment variable. Only digests are kept in memory. A missing or
unknown token is 401; a known token used on a line it does not cover is 403.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Iterable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from anomalyfleet.errors import ConfigError

ALL_LINES = "*"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenGrant(BaseModel):
    """One bearer token and what it may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "client"
    token: SecretStr | None = None
    token_sha256: str | None = None
    token_env: str | None = None
    lines: list[str] = Field(default_factory=lambda: [ALL_LINES])
    admin: bool = False  # may trigger a registry reload

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not _HEX64.match(value.lower()):
            raise ValueError("token_sha256 must be 64 hex digits")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _one_source(self) -> "TokenGrant":
        given = [x for x in (self.token, self.token_sha256, self.token_env) if x]
        if len(given) != 1:
            raise ValueError(f"token grant {self.name!r} needs exactly one of token, token_sha256, token_env")
        return self

    def digest(self, environ: dict[str, str] | None = None) -> str:
        if self.token is not None:
            return token_digest(self.token.get_secret_value())
        if self.token_sha256:
            return self.token_sha256
        env = os.environ if environ is None else environ
        value = env.get(self.token_env or "")
        if not value:
            raise ConfigError(f"token grant {self.name!r}: environment variable {self.token_env} is not set")
        return token_digest(value)


@dataclass(frozen=True)
class Principal:
    name: str
    lines: frozenset[str]  # contains ALL_LINES for unrestricted clients
    admin: bool = False

    def may_use(self, line: str) -> bool:
        return ALL_LINES in self.lines or line in self.lines


ANONYMOUS = Principal(name="anonymous", lines=frozenset({ALL_LINES}), admin=True)


class AuthError(Exception):
    def __init__(self, status: int, kind: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.kind = kind
        self.reason = reason


class Authenticator:
    """Maps token digests to principals; rebuilt whenever the registry's line tokens change."""

    def __init__(self, grants: Iterable[TokenGrant], required: bool | None = None,
                 environ: dict[str, str] | None = None):
        table: dict[str, Principal] = {}
        for grant in grants:
            digest = grant.digest(environ)
            known = table.get(digest)
            # The same secret may be listed for a client and for a line: it gets the union.
            lines = frozenset(grant.lines) | (known.lines if known else frozenset())
            name = known.name if known else grant.name
            table[digest] = Principal(name=name, lines=lines, admin=grant.admin or (known.admin if known else False))
        self._table = table
        self.required = bool(table) if required is None else required

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.required:
            return ANONYMOUS
        if not authorization:
            raise AuthError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "unauthorized", "expected an 'Authorization: Bearer <token>' header")
        # Looking up the digest, not the token, means a timing difference can at most reveal
        # bits of a hash, never of a secret.
        principal = self._table.get(token_digest(token.strip()))
        if principal is None:
            raise AuthError(401, "unauthorized", "invalid bearer token")
        return principal

    def authorize(self, principal: Principal, line: str) -> None:
        if not principal.may_use(line):
            raise AuthError(403, "forbidden", f"this token is not allowed to use line {line!r}")

    def require_admin(self, principal: Principal) -> None:
        if not principal.admin:
            raise AuthError(403, "forbidden", "this token may not administer the service")


__all__ = ["ALL_LINES", "ANONYMOUS", "AuthError", "Authenticator", "Principal", "TokenGrant", "token_digest"]
