from __future__ import annotations

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from toot import ConfigError
from toot.conf import DEFAULT_REDIS_URL, DEFAULT_RETRY_SCHEDULE, DEFAULTS, Source, conf

PUBLISHER = {
    "SUBSCRIPTION_URL": "https://pub.example/toot/subscriptions",
    "CHANNEL_PREFIX": "org.example.pub.",
}


def toot(**options):
    """The tests' TOOT setting with ``options`` changed."""
    return override_settings(TOOT={**settings.TOOT, **options})


@pytest.fixture
def no_redis_hints(monkeypatch):
    """No REDIS_URL setting, no $TOOT_REDIS_URL and no CELERY_BROKER_URL."""
    monkeypatch.delenv("TOOT_REDIS_URL", raising=False)
    raw = {key: value for key, value in settings.TOOT.items() if key != "REDIS_URL"}
    with override_settings(TOOT=raw):
        del settings.CELERY_BROKER_URL
        yield


def test_defaults(no_redis_hints):
    with override_settings(TOOT={}):
        assert conf.CHANNEL_PREFIX == ""
        assert conf.CALLBACK_URL is None
        assert conf.SOURCES == {}
        assert conf.REDIS_URL == DEFAULT_REDIS_URL == "redis://127.0.0.1:6379/0"
        assert conf.REDIS_CONNECTION is None
        assert conf.HTTP_SESSION is None
        assert conf.KEY_PREFIX == "toot:"
        assert conf.CONNECT_TIMEOUT == 5.0
        assert conf.READ_TIMEOUT == 15.0
        assert conf.REDIS_TIMEOUT == 5.0
        assert conf.MAX_EVENT_BYTES == 256 * 1024
        assert conf.RETRY_SCHEDULE == DEFAULT_RETRY_SCHEDULE
        assert conf.DEDUPE_TTL == 3 * 24 * 3600
        assert conf.RELAY_INTERVAL == 1.0
    # about 28 hours in all, as Svix / Standard Webhooks
    assert 27 * 3600 < sum(DEFAULT_RETRY_SCHEDULE) < 29 * 3600


def test_every_default_has_a_property():
    assert all(isinstance(getattr(type(conf), key), property) for key in DEFAULTS)


def test_missing_toot_setting_means_defaults():
    with override_settings():
        del settings.TOOT
        assert conf.raw == {}
        assert conf.KEY_PREFIX == "toot:"


def test_toot_setting_must_be_a_dict():
    with (
        override_settings(TOOT=[("CHANNEL_PREFIX", "x.")]),
        pytest.raises(ConfigError, match="TOOT"),
    ):
        conf.CHANNEL_PREFIX  # noqa: B018


def test_config_error_is_improperly_configured():
    assert issubclass(ConfigError, ImproperlyConfigured)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("CHANNEL_PREFIX", "org.example.other.", "org.example.other."),
        (
            "CALLBACK_URL",
            "https://sub.example/toot/callbacks",
            "https://sub.example/toot/callbacks",
        ),
        ("CALLBACK_URL", None, None),
        ("REDIS_URL", "redis://redis.example:6380/2", "redis://redis.example:6380/2"),
        ("REDIS_CONNECTION", "myproject.redis.client", "myproject.redis.client"),
        ("HTTP_SESSION", "myproject.http.session", "myproject.http.session"),
        ("KEY_PREFIX", "myproject:toot:", "myproject:toot:"),
        ("KEY_PREFIX", "", ""),
        ("CONNECT_TIMEOUT", 2, 2.0),
        ("READ_TIMEOUT", 0.5, 0.5),
        ("REDIS_TIMEOUT", 1, 1.0),
        ("MAX_EVENT_BYTES", 1024, 1024),
        ("MAX_EVENT_BYTES", 1e6, 1_000_000),
        ("RETRY_SCHEDULE", [0, 1, 2.5], (0.0, 1.0, 2.5)),
        ("RETRY_SCHEDULE", (60,), (60.0,)),
        ("RETRY_SCHEDULE", [], ()),
        ("DEDUPE_TTL", 3600, 3600),
        ("RELAY_INTERVAL", 0.25, 0.25),
    ],
)
def test_override(key, value, expected):
    with toot(**{key: value}):
        assert getattr(conf, key) == expected
        assert type(getattr(conf, key)) is type(expected)


def test_settings_are_read_on_every_access():
    assert conf.CHANNEL_PREFIX == "org.example.test."
    with toot(CHANNEL_PREFIX="org.example.first."):
        assert conf.CHANNEL_PREFIX == "org.example.first."
        with toot(CHANNEL_PREFIX="org.example.second."):
            assert conf.CHANNEL_PREFIX == "org.example.second."
        assert conf.CHANNEL_PREFIX == "org.example.first."
    assert conf.CHANNEL_PREFIX == "org.example.test."


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CHANNEL_PREFIX", None),
        ("CHANNEL_PREFIX", 5),
        ("CALLBACK_URL", b"https://sub.example/toot/callbacks"),
        ("REDIS_URL", 6379),
        ("REDIS_CONNECTION", print),
        ("HTTP_SESSION", ["myproject.http.session"]),
        ("KEY_PREFIX", None),
        ("CONNECT_TIMEOUT", 0),
        ("CONNECT_TIMEOUT", -1),
        ("CONNECT_TIMEOUT", "5"),
        ("CONNECT_TIMEOUT", None),
        ("CONNECT_TIMEOUT", True),
        ("CONNECT_TIMEOUT", float("nan")),
        ("CONNECT_TIMEOUT", float("inf")),
        ("READ_TIMEOUT", 0.0),
        ("READ_TIMEOUT", "15"),
        ("REDIS_TIMEOUT", -0.5),
        ("REDIS_TIMEOUT", False),
        ("MAX_EVENT_BYTES", 0),
        ("MAX_EVENT_BYTES", "256k"),
        ("MAX_EVENT_BYTES", 0.5),
        ("RETRY_SCHEDULE", 60),
        ("RETRY_SCHEDULE", "5,10"),
        ("RETRY_SCHEDULE", [5, -1]),
        ("RETRY_SCHEDULE", [5, "10"]),
        ("RETRY_SCHEDULE", [True]),
        ("RETRY_SCHEDULE", None),
        ("DEDUPE_TTL", 0),
        ("DEDUPE_TTL", "3d"),
        ("RELAY_INTERVAL", -1),
        ("RELAY_INTERVAL", None),
        ("RETRY_SCHEDULE", [5, float("inf")]),
        ("RETRY_SCHEDULE", [float("nan")]),
    ],
)
def test_invalid_value_raises_config_error_naming_the_key(key, value):
    with toot(**{key: value}), pytest.raises(ConfigError, match=rf'TOOT\["{key}"\]'):
        getattr(conf, key)


def test_an_invalid_value_does_not_break_the_other_keys():
    with toot(CONNECT_TIMEOUT="soon"):
        assert conf.READ_TIMEOUT == 15.0
        assert conf.CHANNEL_PREFIX == "org.example.test."


# REDIS_URL: the explicit setting, else $TOOT_REDIS_URL, else a Redis broker, else the default.


def test_redis_url_setting_comes_first(monkeypatch):
    monkeypatch.setenv("TOOT_REDIS_URL", "redis://env.example:6379/1")
    with (
        toot(REDIS_URL="redis://setting.example:6379/2"),
        override_settings(CELERY_BROKER_URL="redis://broker.example:6379/3"),
    ):
        assert conf.REDIS_URL == "redis://setting.example:6379/2"


@pytest.mark.parametrize("unset", [None, ""])
def test_redis_url_then_the_environment(no_redis_hints, monkeypatch, unset):
    monkeypatch.setenv("TOOT_REDIS_URL", "redis://env.example:6379/1")
    with (
        toot(REDIS_URL=unset),
        override_settings(CELERY_BROKER_URL="redis://broker.example:6379/3"),
    ):
        assert conf.REDIS_URL == "redis://env.example:6379/1"


def test_redis_url_environment_is_read_on_every_access(no_redis_hints, monkeypatch):
    monkeypatch.setenv("TOOT_REDIS_URL", "redis://env.example:6379/1")
    assert conf.REDIS_URL == "redis://env.example:6379/1"
    monkeypatch.setenv("TOOT_REDIS_URL", "redis://env.example:6379/4")
    assert conf.REDIS_URL == "redis://env.example:6379/4"


@pytest.mark.parametrize(
    "broker", ["redis://broker.example:6379/3", "rediss://:pw@broker.example:6380/0"]
)
def test_redis_url_then_a_redis_celery_broker(no_redis_hints, broker):
    with override_settings(CELERY_BROKER_URL=broker):
        url = conf.REDIS_URL
    assert url == broker


@pytest.mark.parametrize("broker", ["amqp://guest@rabbit.example//", "sqs://", "", None])
def test_redis_url_ignores_a_broker_that_is_not_redis(no_redis_hints, broker):
    with override_settings(CELERY_BROKER_URL=broker):
        assert conf.REDIS_URL == DEFAULT_REDIS_URL


def test_redis_url_empty_environment_is_ignored(no_redis_hints, monkeypatch):
    monkeypatch.setenv("TOOT_REDIS_URL", "")
    assert conf.REDIS_URL == DEFAULT_REDIS_URL


def test_redis_url_default(no_redis_hints):
    assert conf.REDIS_URL == "redis://127.0.0.1:6379/0"


# SOURCES


def test_sources_are_parsed():
    other = {"SUBSCRIPTION_URL": "http://other.example/subs", "CHANNEL_PREFIX": ""}
    with toot(SOURCES={"pub": PUBLISHER, "other": other}):
        parsed = conf.SOURCES
        source = conf.source("pub")
    assert parsed == {
        "pub": Source("pub", "https://pub.example/toot/subscriptions", "org.example.pub."),
        "other": Source("other", "http://other.example/subs", ""),
    }
    assert source.name == "pub"
    assert source.subscription_url == "https://pub.example/toot/subscriptions"
    assert source.channel_prefix == "org.example.pub."


def test_tests_settings_source():
    assert conf.source("publisher") == Source(
        "publisher", "http://publisher.example/toot/subscriptions", "org.example.publisher."
    )


def test_unknown_source_raises_config_error_naming_it():
    with pytest.raises(ConfigError, match='"nowhere"') as excinfo:
        conf.source("nowhere")
    assert 'TOOT["SOURCES"]["nowhere"]' in str(excinfo.value)


def test_source_disappears_with_the_settings():
    with toot(SOURCES={"pub": PUBLISHER}):
        assert conf.source("pub").channel_prefix == "org.example.pub."
    with pytest.raises(ConfigError, match='"pub"'):
        conf.source("pub")


@pytest.mark.parametrize(
    ("sources", "named"),
    [
        ([PUBLISHER], r'TOOT\["SOURCES"\]'),
        (None, r'TOOT\["SOURCES"\]'),
        ({"pub": "https://pub.example/toot/subscriptions"}, r'TOOT\["SOURCES"\]\["pub"\]'),
        ({"pub": {"CHANNEL_PREFIX": "x."}}, r'TOOT\["SOURCES"\]\["pub"\]\["SUBSCRIPTION_URL"\]'),
        (
            {"pub": {"SUBSCRIPTION_URL": "https://pub.example/s"}},
            r'TOOT\["SOURCES"\]\["pub"\]\["CHANNEL_PREFIX"\]',
        ),
        (
            {"pub": {"SUBSCRIPTION_URL": "https://pub.example/s", "CHANNEL_PREFIX": None}},
            r'TOOT\["SOURCES"\]\["pub"\]\["CHANNEL_PREFIX"\]',
        ),
        (
            {"pub": {"SUBSCRIPTION_URL": 5, "CHANNEL_PREFIX": "x."}},
            r'TOOT\["SOURCES"\]\["pub"\]\["SUBSCRIPTION_URL"\]',
        ),
    ],
)
def test_invalid_sources_raise_config_error_naming_the_key(sources, named):
    with toot(SOURCES=sources):
        with pytest.raises(ConfigError, match=named):
            conf.SOURCES  # noqa: B018
        with pytest.raises(ConfigError, match=named):
            conf.source("pub")
