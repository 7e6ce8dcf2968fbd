"""SSH keys as the operator sees them: host keys pinned by their SHA256 fingerprint, private keys checked
before they are stored. asyncssh parses them, so what passes here is what a connection will accept."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncssh

# asyncssh is imported where a key is read, not here: models import this module, so every process of the
# server would pay its ~130 ms import (with cryptography's) at start, and only the hosts' pages and jobs use it.


class UnusableKey(ValueError):
    """A key that cannot be used, with a sentence for the operator."""


def parse_host_key(text: str) -> asyncssh.SSHKey:
    """The public key of an OpenSSH line ("ssh-ed25519 AAAA… comment" or a known_hosts line)."""
    line = (text or "").strip()
    parts = line.split()
    # A known_hosts line starts with the host pattern: skip to the key type.
    while parts and not (parts[0].startswith(("ssh-", "ecdsa-", "sk-"))):
        parts = parts[1:]
    import asyncssh

    try:
        return asyncssh.import_public_key(" ".join(parts[:2]))
    except (asyncssh.KeyImportError, ValueError):
        raise UnusableKey("not an OpenSSH public key line (expected e.g. 'ssh-ed25519 AAAA…')") from None


def normalize_host_key(text: str) -> str:
    """The key as one canonical 'type base64' line, so comparisons ignore comments and spacing."""
    return parse_host_key(text).export_public_key("openssh").decode().strip()


def fingerprint(text: str) -> str:
    """SHA256:… as `ssh-keygen -lf` prints it, or "" for no key."""
    if not text:
        return ""
    try:
        return parse_host_key(text).get_fingerprint("sha256")
    except UnusableKey:
        return "(unreadable key)"


def check_private_key(text: str) -> asyncssh.SSHKey:
    """The private key, or UnusableKey saying why it cannot be used (passphrase-protected keys are refused:
    nobody is there to type the passphrase when a background job connects)."""
    import asyncssh

    try:
        return asyncssh.import_private_key(text)
    except asyncssh.KeyEncryptionError:
        raise UnusableKey("this private key is protected by a passphrase; store an unencrypted key") from None
    except (asyncssh.KeyImportError, ValueError):
        raise UnusableKey("not a private key in OpenSSH or PEM format") from None
