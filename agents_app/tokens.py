"""Token minting and hashing. Tokens are 256-bit random secrets; only their SHA-256 is stored.

A plain SHA-256 suffices (no slow KDF): the secrets are random, not guessable passwords, and looking them up
by hash compares in constant time with respect to the secret.
"""

import hashlib
import secrets

ENROLLMENT, AGENT, API = "cpe_", "cpa_", "cpu_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def mint(kind: str) -> tuple[str, str, str]:
    """A fresh token of `kind`: (token, its hash, its display prefix)."""
    token = kind + secrets.token_urlsafe(32)
    return token, hash_token(token), token[:10]


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
