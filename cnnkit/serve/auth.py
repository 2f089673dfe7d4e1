"""API keys for ``cnnkit serve`` (``--api-key-file``): ``Authorization: Bearer <key>``.

The file holds one key per line, optionally after a name (``NAME KEY``); blank lines and lines
starting with ``#`` are skipped. Keys are kept only as SHA-256 digests, compared in constant time
against every key (a match does not return early), and never logged: the request log names the
key's owner instead.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat

from ..errors import ConfigError

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
KEY_PATTERN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: what a header can carry
REALM = 'Bearer realm="cnnkit"'


class ApiKeys:
    """The keys a server accepts, by owner name."""

    def __init__(self, keys: dict[str, str]):
        if not keys:
            raise ConfigError("the API key file holds no keys: one key per line (NAME KEY, or KEY)")
        self._digests = [(name, hashlib.sha256(key.encode()).digest()) for name, key in keys.items()]

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def from_file(cls, path: str) -> "ApiKeys":
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            mode = os.stat(path).st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the API key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        keys = cls(parse_keys(text, path))
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("the API key file %s can be read by other users; chmod 600 it", path)
        return keys

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key in an ``Authorization`` header value, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, known in self._digests:  # every key is compared: the time says nothing of which matched
            if hmac.compare_digest(digest, known):
                found = name
        return found


def parse_keys(text: str, path: str = "the API key file") -> dict[str, str]:
    """``{name: key}`` from the file's text; a key without a name is called ``key-<line>``."""
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) > 2:
            raise ConfigError(f"{path}, line {number}: give KEY or NAME KEY (a key has no spaces)")
        name, key = (fields[0], fields[1]) if len(fields) == 2 else (f"key-{number}", fields[0])
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"{path}, line {number}: a key's name is 1-64 letters, digits or . _ @ -")
        if len(key) < MIN_KEY_LENGTH or not KEY_PATTERN.fullmatch(key):
            raise ConfigError(f"{path}, line {number}: a key is at least {MIN_KEY_LENGTH} printable ASCII characters "
                              "with no spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if name in keys:
            raise ConfigError(f"{path}, line {number}: the name {name!r} is given twice")
        if key in keys.values():
            raise ConfigError(f"{path}, line {number}: this key is given twice")
        keys[name] = key
    return keys
