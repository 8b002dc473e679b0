"""Issue 12: the dashboard's files as `ufo_trio._dashboard` serves them (no browser needed)."""

from __future__ import annotations

import re

import pytest

from ufo_trio._dashboard import CONTENT_SECURITY_POLICY, Dashboard


@pytest.fixture(scope="module")
def dashboard() -> Dashboard:
    return Dashboard()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/dashboard", "text/html; charset=utf-8"),
        ("/dashboard/", "text/html; charset=utf-8"),
        ("/dashboard/dashboard.css", "text/css; charset=utf-8"),
        ("/dashboard/dashboard.js", "text/javascript; charset=utf-8"),
    ],
)
def test_paths_and_headers(dashboard: Dashboard, path: str, content_type: str) -> None:
    found = dashboard.lookup(path)
    assert found is not None
    headers = dict(found.headers)
    assert headers["Content-Type"] == content_type
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["ETag"].startswith('"')
    assert found.body


@pytest.mark.parametrize(
    "path", ["/index.html", "/dashboard/index.html", "/dashboard/../x", "/api/clients", "/ws", ""]
)
def test_other_paths_are_not_dashboard(dashboard: Dashboard, path: str) -> None:
    assert dashboard.lookup(path) is None


def test_policy_forbids_inline_and_foreign_content() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


def test_page_has_no_inline_script_style_or_remote_reference(dashboard: Dashboard) -> None:
    html = dashboard.lookup("/")
    assert html is not None
    page = html.body.decode()
    # Scripts only by src; no inline handlers or style attributes; nothing from another origin.
    for tag in re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.S):
        assert tag.strip() == ""
    assert re.search(r"\son[a-z]+\s*=", page) is None
    assert re.search(r"\sstyle\s*=", page) is None
    assert "http://" not in page.replace("http://www.w3.org", "")
    assert "https://" not in page
    script = dashboard.lookup("/dashboard/dashboard.js")
    assert script is not None
    js = script.body.decode()
    # Client strings reach the DOM only as text.
    assert "innerHTML" not in js
    assert "outerHTML" not in js
    assert "insertAdjacentHTML" not in js
    assert "document.write" not in js
    assert "eval(" not in js
    # The key is sent as a header and kept per tab; never in localStorage or a URL.
    assert '"Bearer "' in js
    assert "localStorage" not in js
    assert "token=" not in js


def test_etag_revalidation(dashboard: Dashboard) -> None:
    page = dashboard.lookup("/")
    script = dashboard.lookup("/dashboard/dashboard.js")
    assert page is not None
    assert script is not None
    assert page.etag != script.etag
    assert page.matches(page.etag)
    assert page.matches(f'"other", W/{page.etag}')
    assert page.matches("*")
    assert not page.matches(script.etag)
    assert not page.matches("")
