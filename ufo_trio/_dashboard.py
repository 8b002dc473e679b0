"""The dashboard's static files (issue 12): loaded once from the package, served with strict headers.

The page (`ufo_trio/dashboard/`) is plain HTML, CSS and one script: no build step, no CDN, no
inline script or style, so the Content-Security-Policy below can forbid everything that does not
come from this server. The files hold no data; the script fetches the JSON API with the key the
operator types in. So the files are served without the API key (the Host check of AUTH-5 still
applies), and everything they show is behind the key.

`Dashboard.lookup(path)` is what the HTTP route table calls for `GET /`, `/dashboard` and the
asset paths; it does no I/O (the files were read when the object was built).
"""

from __future__ import annotations

import hashlib
import importlib.resources
from typing import Final

import attrs

#: No inline script or style, nothing from elsewhere, no framing, no form posts, no <base>.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
#: URL path → file name. `/` and `/dashboard` are the page; the assets sit under /dashboard/.
ROUTES: Final = {
    "/": "index.html",
    "/dashboard": "index.html",
    "/dashboard/": "index.html",
    "/dashboard/dashboard.css": "dashboard.css",
    "/dashboard/dashboard.js": "dashboard.js",
}


@attrs.frozen(kw_only=True)
class StaticFile:
    """One answer: 200 with these headers and body."""

    content_type: str
    body: bytes
    etag: str

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Every header of the 200 except Content-Length (the HTTP layer adds that)."""
        return [
            ("Content-Type", self.content_type),
            ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"),
            # Revalidate every time: the files change with the server version, and are small.
            ("Cache-Control", "no-cache"),
            ("ETag", self.etag),
        ]


    def matches(self, if_none_match: str) -> bool:
        """True if an `If-None-Match` value names this file: answer 304 with the same headers."""
        for tag in if_none_match.split(","):
            tag = tag.strip()
            if tag == "*" or tag.removeprefix("W/") == self.etag:
                return True
        return False


class Dashboard:
    """The page and its assets, read from the installed package once, at construction."""

    def __init__(self) -> None:
        root = importlib.resources.files("ufo_trio") / "dashboard"
        files: dict[str, StaticFile] = {}
        for name, content_type in _FILES.items():
            body = (root / name).read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            files[name] = StaticFile(content_type=content_type, body=body, etag=etag)
        self._files = files

    def lookup(self, path: str) -> StaticFile | None:
        """The file for a request path (query already removed), or None (not a dashboard path)."""
        name = ROUTES.get(path)
        return None if name is None else self._files[name]
