"""The browser page of ``cnnkit serve`` (``GET /``): one self-contained HTML file, ``page.html``.

Its style and script are inline and it loads nothing from anywhere else (no CDN, no fonts, no
build step), so it works offline. It calls the server's own ``/metadata`` and ``/predict``. The
Content-Security-Policy sent with it allows exactly that: the inline style and script by their
SHA-256 (any other script, and any other origin, is blocked), images from the files the user
picks (``blob:``; ``data:`` for the empty icon), requests to the server itself. A leaf of :mod:`cnnkit.serve`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


@functools.lru_cache(maxsize=1)
def page() -> tuple[bytes, str]:
    """``(page.html as bytes, its Content-Security-Policy header value)``."""
    html = resources.files("cnnkit.serve").joinpath("page.html").read_text(encoding="utf-8")
    scripts = [_sha256_source(s) for s in re.findall(r"<script>(.*?)</script>", html, flags=re.S)]
    styles = [_sha256_source(s) for s in re.findall(r"<style>(.*?)</style>", html, flags=re.S)]
    policy = "; ".join([
        "default-src 'none'",
        "script-src " + " ".join(scripts),
        "style-src " + " ".join(styles),
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return html.encode("utf-8"), policy
