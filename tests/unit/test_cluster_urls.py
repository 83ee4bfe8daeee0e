"""Redis URLs in the cluster's messages (ptth_lib/relay/cluster/store.py): the password never shows."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ptth_lib.errors import ConfigError
from ptth_lib.relay.cluster.store import Store, redacted

CASES = [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://relay:secret@redis.internal:6379/2", "redis://relay:***@redis.internal:6379/2"),
    ("rediss://relay:p%40ss%3Aword@redis.example:6380/0", "rediss://relay:***@redis.example:6380/0"),
    ("redis://secret@127.0.0.1/0", "redis://***@127.0.0.1/0"),  # a password without its colon
    ("redis://:pa@ss@127.0.0.1/0", "redis://:***@127.0.0.1/0"),  # an unescaped @ in the password
    ("unix:///run/redis/redis.sock?db=1", "unix:///run/redis/redis.sock?db=1"),
    ("unix://:secret@/run/redis/redis.sock?db=1", "unix://:***@/run/redis/redis.sock?db=1"),
    ("unix:///run/redis/redis.sock?db=1&password=secret", "unix:///run/redis/redis.sock?db=1&password=***"),
    ("redis://127.0.0.1/0?PASSWORD=secret", "redis://127.0.0.1/0?PASSWORD=***"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
]


@pytest.mark.parametrize(("url", "shown"), CASES)
def test_redacted_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_a_malformed_url_is_not_quoted_at_all() -> None:
    assert "secret" not in redacted("redis://:secret@[::1/0")


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="@:/?#&=%[]"),
               min_size=4))
def test_no_password_survives_redaction(password: str) -> None:
    for template in ("redis://:{}@h:1/0", "redis://user:{}@h:1/0", "rediss://{}@h/0", "unix:///s.sock?password={}"):
        # A password that is part of the URL's other text ("pass" in "password=") proves nothing.
        assume(password not in template.format(""))
        assert password not in redacted(template.format(password)).replace("***", "")


@pytest.mark.parametrize("url", ["http://:secret@127.0.0.1/", "127.0.0.1:6379", "redis://:secret@h/cache",
                                 "redis://:secret@h:port/0", "redis://:secret@h/0?socket_timeout=x",
                                 "redis://:secret@[::1/0", "redis://:secret@/0"])
def test_a_url_redis_cannot_use_is_a_config_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Store.from_url(url)
    assert "secret" not in str(refused.value)
    assert "redis_url" in str(refused.value)
