"""core/hosts.origin_allowed: which Origin headers may drive a server with a POST (serve.py)."""

from __future__ import annotations

import pytest

from ultimate_trainer.core.hosts import allowed_hosts, origin_allowed

HOSTS = allowed_hosts("127.0.0.1")


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1:8083", "http://localhost", "https://LOCALHOST:1",
                                    "http://[::1]:8083"])
def test_no_origin_and_this_machines_own_origins_are_allowed(origin):
    assert origin_allowed(origin, HOSTS)


@pytest.mark.parametrize("origin", ["null", "http://evil.example", "http://127.0.0.1.evil.example",
                                    "http://localhost.evil.example:8083", "file://", "ftp://localhost",
                                    "http://localhost/path", "localhost", ""])
def test_null_foreign_and_malformed_origins_are_refused(origin):
    assert not origin_allowed(origin, HOSTS)


def test_a_name_given_with_allow_host_is_an_allowed_origin():
    assert origin_allowed("https://proxy.example", allowed_hosts("127.0.0.1", ["proxy.example"]))
