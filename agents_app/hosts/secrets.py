"""Private keys of hosts, encrypted at rest with a secret from the environment.

`CP_HOST_KEY_SECRET` holds one or more Fernet keys separated by commas: the first encrypts, all decrypt, so
a secret can be rotated by prepending a new one (and re-saving the hosts' keys). Without it no key can be
stored in the database; a host can still use a key file (`key_path`).
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

HOW_TO = (
    "set CP_HOST_KEY_SECRET to a Fernet key, e.g. the output of "
    "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
)


class SecretUnavailable(Exception):
    """No secret configured, or the stored key was encrypted with a secret we no longer have."""


def _fernet() -> MultiFernet:
    secrets = [s.strip() for s in settings.CP_HOST_KEY_SECRET.split(",") if s.strip()]
    if not secrets:
        raise SecretUnavailable(f"no secret to encrypt host keys with: {HOW_TO}")
    try:
        return MultiFernet([Fernet(s.encode()) for s in secrets])
    except ValueError:
        raise SecretUnavailable(f"CP_HOST_KEY_SECRET is not a valid Fernet key: {HOW_TO}") from None


def encrypt_private_key(text: str) -> str:
    return _fernet().encrypt(text.encode()).decode()


def decrypt_private_key(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretUnavailable("the stored private key does not decrypt with CP_HOST_KEY_SECRET (rotated?)") from None
