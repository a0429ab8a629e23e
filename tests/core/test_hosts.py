"""The same-origin rule (core/hosts.py) on header values, as every server that accepts writes applies it."""

from __future__ import annotations

import pytest

from ultimate_trainer.core.hosts import is_loopback, refusal, same_origin


@pytest.mark.parametrize("origin, host", [
    ("http://127.0.0.1:8082", "127.0.0.1:8082"), ("http://localhost:8082", "LOCALHOST:8082"),
    ("http://[::1]:8082", "[::1]:8082"), ("http://localhost", "localhost"), ("http://localhost", "localhost:80"),
    ("https://proxy.example", "proxy.example"), ("https://proxy.example:443", "proxy.example"),
])
def test_the_same_origin(origin, host):
    assert same_origin(origin, host)


@pytest.mark.parametrize("origin, host", [
    ("http://evil.example", "127.0.0.1:8082"), ("null", "127.0.0.1:8082"), ("", "127.0.0.1:8082"),
    ("http://127.0.0.1:8080", "127.0.0.1:8082"),     # another local port: same site, not the same origin
    ("http://localhost:8082", "127.0.0.1:8082"),     # another name for the same address is another origin
    ("http://127.0.0.1:8082.evil.example", "127.0.0.1:8082"), ("http://127.0.0.1:8082@evil.example", "127.0.0.1:8082"),
    ("http://user@127.0.0.1:8082", "127.0.0.1:8082"), ("file://", "127.0.0.1:8082"), ("ftp://127.0.0.1:8082", "127.0.0.1:8082"),
    ("http://127.0.0.1:8082/path", "127.0.0.1:8082"), ("http://127.0.0.1:99999", "127.0.0.1:99999"),
    ("http://127.0.0.1:8082 http://evil.example", "127.0.0.1:8082"), ("http://[::1]:8082", "::1:8082"),
    ("http://127.0.0.1:8082", ""),
])
def test_not_the_same_origin(origin, host):
    assert not same_origin(origin, host)


HOST = {"host": "127.0.0.1:8082"}


def test_writes_need_their_own_origin_or_none_at_all():
    assert refusal("POST", {**HOST, "origin": "http://127.0.0.1:8082", "sec-fetch-site": "same-origin",
                            "content-type": "application/json"}) is None
    assert refusal("POST", {**HOST, "content-type": "application/json"}) is None  # a program, not a page
    assert "Origin 'http://evil.example'" in refusal("POST", {**HOST, "origin": "http://evil.example"})
    assert "Origin 'null'" in refusal("POST", {**HOST, "origin": "null"})
    assert "cross-site" in refusal("POST", {**HOST, "sec-fetch-site": "cross-site"})
    assert "same-site" in refusal("PUT", {**HOST, "sec-fetch-site": "same-site"})
    assert "text/plain" in refusal("POST", {**HOST, "content-type": "text/plain;charset=UTF-8"})
    assert "x-www-form-urlencoded" in refusal("POST", {**HOST, "origin": "http://127.0.0.1:8082",
                                                       "content-type": "application/x-www-form-urlencoded"})
    assert refusal("OPTIONS", {**HOST, "origin": "http://evil.example"}) is not None  # a preflight


def test_reads_from_another_site_are_served_only_as_a_navigation():
    assert refusal("GET", HOST) is None
    assert refusal("GET", {**HOST, "sec-fetch-site": "same-origin", "sec-fetch-mode": "cors"}) is None
    assert refusal("GET", {**HOST, "sec-fetch-site": "none", "sec-fetch-mode": "navigate"}) is None
    assert refusal("GET", {**HOST, "sec-fetch-site": "same-site", "sec-fetch-mode": "navigate",
                           "sec-fetch-dest": "document"}) is None  # the live page's link to the workbench
    assert refusal("GET", {**HOST, "sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors",
                           "sec-fetch-dest": "script"}) is not None
    assert refusal("GET", {**HOST, "sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate",
                           "sec-fetch-dest": "iframe"}) is not None
    assert refusal("HEAD", {**HOST, "sec-fetch-site": "same-site", "sec-fetch-mode": "cors"}) is not None


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.5", False),
    ("example.com", False), ("localhost.evil.example", False), ("::ffff:127.0.0.1", True),
    ("[::ffff:127.0.0.1]", True), ("::ffff:10.0.0.1", False),
])
def test_is_loopback(host, loopback):
    """serve.py asks for an API key unless it binds here: the one rule, in core/hosts.py."""
    assert is_loopback(host) is loopback
