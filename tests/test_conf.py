from __future__ import annotations

import ipaddress
from pathlib import Path

import certifi
import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from tests.utils import unreachable_redis
from toot import ConfigError
from toot.conf import (
    DEFAULT_REDIS_URL,
    DEFAULT_RETRY_SCHEDULE,
    DEFAULTS,
    Settings,
    Source,
    conf,
    setting,
)

pytestmark = pytest.mark.usefixtures("no_drain_at_work")

# Files that exist: conf checks the TLS settings' shape and that their files exist; the
# system checks load them (tests/test_checks.py), and tests/test_transport.py uses them.
CA_FILE = certifi.where()
CA_DIR = str(Path(CA_FILE).parent)
KEY_FILE = __file__

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
        assert conf.PROXY_URL is None
        assert conf.CA_BUNDLE is None
        assert conf.CLIENT_CERT is None
        assert conf.KEY_PREFIX == "toot:"
        assert conf.CONNECT_TIMEOUT == 5.0
        assert conf.READ_TIMEOUT == 15.0
        assert conf.REDIS_TIMEOUT == 5.0
        assert conf.MAX_EVENT_BYTES == 256 * 1024
        assert conf.RETRY_SCHEDULE == DEFAULT_RETRY_SCHEDULE
        assert conf.DEDUPE_TTL == 3 * 24 * 3600
        assert conf.RELAY_INTERVAL == 1.0
        assert conf.MAX_DRAINS == 4
        assert conf.BATCH is True
        assert conf.BATCH_MAX_EVENTS == 100
        assert conf.SIGNING_SECRETS == ()
        assert conf.SUBSCRIPTIONS_AUTH is None
    # about 28 hours in all, as Svix / Standard Webhooks
    assert 27 * 3600 < sum(DEFAULT_RETRY_SCHEDULE) < 29 * 3600


def test_every_default_has_a_property():
    assert all(isinstance(getattr(type(conf), key), setting) for key in DEFAULTS)


def test_missing_toot_setting_means_defaults():
    try:
        with override_settings():
            del settings.TOOT
            conf.forget()  # Django sends no setting_changed for a deleted setting
            assert conf.raw == {}
            assert conf.KEY_PREFIX == "toot:"
    finally:
        conf.forget()


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
        ("REDIS_CONNECTION", "tests.utils.unreachable_redis", unreachable_redis),
        ("PROXY_URL", "http://proxy.internal:3128", "http://proxy.internal:3128"),
        ("PROXY_URL", "https://u:p%40ss@proxy.internal/", "https://u:p%40ss@proxy.internal/"),
        ("PROXY_URL", "http://[fd00::1]:8080", "http://[fd00::1]:8080"),
        ("PROXY_URL", None, None),
        ("CA_BUNDLE", CA_FILE, CA_FILE),
        ("CA_BUNDLE", Path(CA_FILE), CA_FILE),
        ("CA_BUNDLE", CA_DIR, CA_DIR),
        ("CLIENT_CERT", CA_FILE, (CA_FILE, None)),
        ("CLIENT_CERT", [CA_FILE, Path(KEY_FILE)], (CA_FILE, KEY_FILE)),
        ("CLIENT_CERT", (Path(CA_FILE),), (CA_FILE, None)),
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
        ("MAX_DRAINS", 1, 1),
        ("MAX_DRAINS", 16.0, 16),
        ("BATCH", False, False),
        ("BATCH", True, True),
        ("BATCH_MAX_EVENTS", 1, 1),
        ("BATCH_MAX_EVENTS", 500.0, 500),
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
        ("PROXY_URL", "socks5://proxy.internal:1080"),
        ("PROXY_URL", "proxy.internal:3128"),
        ("PROXY_URL", "http://"),
        ("PROXY_URL", "http://proxy.internal:99999"),
        ("PROXY_URL", "http://proxy.internal/some/path"),
        ("PROXY_URL", "http://proxy.internal/?q=1"),
        ("PROXY_URL", "http://[::1"),
        ("PROXY_URL", 3128),
        ("PROXY_URL", b"http://proxy.internal:3128"),
        ("CA_BUNDLE", "/nonexistent/ca.pem"),
        ("CA_BUNDLE", ""),
        ("CA_BUNDLE", True),
        ("CA_BUNDLE", [CA_FILE]),
        ("CLIENT_CERT", "/nonexistent/cert.pem"),
        ("CLIENT_CERT", CA_DIR),
        ("CLIENT_CERT", [CA_FILE, "/nonexistent/key.pem"]),
        ("CLIENT_CERT", [CA_FILE, KEY_FILE, KEY_FILE]),
        ("CLIENT_CERT", []),
        ("CLIENT_CERT", {"cert": CA_FILE}),
        ("CLIENT_CERT", 5),
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
        ("MAX_DRAINS", 0),
        ("MAX_DRAINS", -1),
        ("MAX_DRAINS", 1.5),
        ("MAX_DRAINS", True),
        ("MAX_DRAINS", "4"),
        ("MAX_DRAINS", None),
        ("MAX_DRAINS", float("inf")),
        ("BATCH", "yes"),
        ("BATCH", "True"),
        ("BATCH", 1),
        ("BATCH", 0),
        ("BATCH", None),
        ("BATCH_MAX_EVENTS", 0),
        ("BATCH_MAX_EVENTS", 2.5),
        ("BATCH_MAX_EVENTS", False),
        ("BATCH_MAX_EVENTS", "100"),
        ("BATCH_MAX_EVENTS", float("nan")),
    ],
)
def test_invalid_value_raises_config_error_naming_the_key(key, value):
    with toot(**{key: value}), pytest.raises(ConfigError, match=rf'TOOT\["{key}"\]'):
        getattr(conf, key)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("MAX_DRAINS", 0, "must be a positive number, not 0"),
        ("MAX_DRAINS", True, "must be a positive number, not True"),
        ("MAX_DRAINS", 1.5, "must be a whole number, not 1.5"),
        ("BATCH", "yes", "must be True or False, not 'yes'"),
        ("BATCH", 1, "must be True or False, not 1"),
        ("BATCH_MAX_EVENTS", 0.5, "must be a whole number, not 0.5"),
    ],
)
def test_invalid_value_messages_say_what_is_expected_and_quote_the_value(key, value, message):
    with toot(**{key: value}), pytest.raises(ConfigError) as excinfo:
        getattr(conf, key)
    assert str(excinfo.value) == f'TOOT["{key}"] {message}.'


@pytest.mark.parametrize(
    "value", ["http://toot:s3cret@proxy.internal:99999", "socks5://toot:s3cret@proxy.internal"]
)
def test_a_bad_proxy_url_is_never_quoted(value):
    # It may hold the proxy's password, and check output ends up in CI logs.
    with toot(PROXY_URL=value), pytest.raises(ConfigError) as excinfo:
        conf.PROXY_URL  # noqa: B018
    assert "s3cret" not in str(excinfo.value)
    assert "http:// or https:// URL" in str(excinfo.value)


def test_http_session_is_no_setting_any_more():
    assert "HTTP_SESSION" not in DEFAULTS
    assert not hasattr(conf, "HTTP_SESSION")


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


def test_redis_url_environment_is_read_again_once_a_setting_changes(no_redis_hints, monkeypatch):
    monkeypatch.setenv("TOOT_REDIS_URL", "redis://env.example:6379/1")
    assert conf.REDIS_URL == "redis://env.example:6379/1"
    monkeypatch.setenv("TOOT_REDIS_URL", "redis://env.example:6379/4")
    assert conf.REDIS_URL == "redis://env.example:6379/1"  # kept: read once per process
    with override_settings(CELERY_BROKER_URL=None):
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


# SIGNING_SECRETS, SUBSCRIPTIONS_AUTH and the sources' SECRET, SECRETS and TOKEN

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def authorize(request):
    """A SUBSCRIPTIONS_AUTH callable of these tests."""
    return True


NOT_CALLABLE = 5


@pytest.mark.parametrize("value", [[SECRET], (SECRET, SECRET), []])
def test_signing_secrets_are_a_tuple(value):
    with toot(SIGNING_SECRETS=value):
        secrets = conf.SIGNING_SECRETS
    assert secrets == tuple(value)


@pytest.mark.parametrize("value", [SECRET, None, [SECRET, 5], {"a": SECRET}])
def test_signing_secrets_of_the_wrong_shape_raise_config_error(value):
    with toot(SIGNING_SECRETS=value), pytest.raises(ConfigError) as excinfo:
        conf.SIGNING_SECRETS  # noqa: B018
    assert 'TOOT["SIGNING_SECRETS"]' in str(excinfo.value)
    assert "MfKQ9r8" not in str(excinfo.value)  # a secret is never quoted


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"TOKENS": ["abc", "d.e-f_g~h+i/j="]}, ("abc", "d.e-f_g~h+i/j=")),
        ({"TOKENS": ("abc",)}, ("abc",)),
        ("tests.test_conf.authorize", authorize),
        (None, None),
    ],
)
def test_subscriptions_auth_forms(value, expected):
    with toot(SUBSCRIPTIONS_AUTH=value):
        auth = conf.SUBSCRIPTIONS_AUTH
    assert auth == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"TOKEN": ["abc"]}, 'the one key "TOKENS"'),
        ({"TOKENS": ["abc"], "REALM": "x"}, 'the one key "TOKENS"'),
        ({}, 'the one key "TOKENS"'),
        ({"TOKENS": []}, "non-empty list"),
        ({"TOKENS": "abc"}, "non-empty list"),
        ({"TOKENS": ["abc", "with space"]}, r'\["TOKENS"\]\[1\] must be a non-empty string'),
        ({"TOKENS": [""]}, r'\["TOKENS"\]\[0\]'),
        ({"TOKENS": [None]}, r'\["TOKENS"\]\[0\]'),
        ({"TOKENS": ["caf\u00e9"]}, "printable ASCII"),
        (True, "must be None"),
        (["abc"], "must be None"),
    ],
)
def test_subscriptions_auth_of_the_wrong_shape_raises_config_error(value, message):
    with toot(SUBSCRIPTIONS_AUTH=value), pytest.raises(ConfigError, match=message) as excinfo:
        conf.SUBSCRIPTIONS_AUTH  # noqa: B018
    assert 'TOOT["SUBSCRIPTIONS_AUTH"]' in str(excinfo.value)
    assert "with space" not in str(excinfo.value)  # a token is never quoted


@pytest.mark.parametrize("key", ["REDIS_CONNECTION", "SUBSCRIPTIONS_AUTH"])
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.test_conf.no_such_function", "cannot be imported"),
        ("no_such_module.factory", "cannot be imported"),
        ("factory", "cannot be imported"),
        ("tests.test_conf.NOT_CALLABLE", "not callable"),
    ],
)
def test_a_dotted_path_that_names_no_callable_raises_config_error(key, path, message):
    """Caught by the system checks (toot.E002), not by the first publish or request."""
    with toot(**{key: path}), pytest.raises(ConfigError, match=message) as excinfo:
        getattr(conf, key)
    assert f'TOOT["{key}"] names {path!r}' in str(excinfo.value)


def test_source_secret_secrets_and_token():
    sources = {
        "one": {**PUBLISHER, "SECRET": SECRET, "TOKEN": "t0ken"},
        "two": {**PUBLISHER, "SECRETS": [SECRET, SECRET[:-1] + "x"]},
        "none": {**PUBLISHER, "SECRET": None, "SECRETS": None, "TOKEN": None},
    }
    with toot(SOURCES=sources):
        one, two, none = conf.source("one"), conf.source("two"), conf.source("none")
    assert (one.secrets, one.token) == ((SECRET,), "t0ken")
    assert (two.secrets, two.token) == ((SECRET, SECRET[:-1] + "x"), None)
    assert (none.secrets, none.token) == ((), None)


def test_a_source_repr_hides_its_secrets_and_token():
    with toot(SOURCES={"pub": {**PUBLISHER, "SECRET": SECRET, "TOKEN": "t0ken"}}):
        text = repr(conf.source("pub"))
    assert "MfKQ9r8" not in text
    assert "t0ken" not in text
    assert "secrets=***" in text and "token=***" in text


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"SECRET": 5}, r'\["pub"\]\["SECRET"\]'),
        ({"SECRET": [SECRET]}, r'\["pub"\]\["SECRET"\]'),
        ({"SECRETS": SECRET}, r'\["pub"\]\["SECRETS"\]'),
        ({"SECRETS": [SECRET, None]}, r'\["pub"\]\["SECRETS"\]'),
        ({"SECRET": SECRET, "SECRETS": [SECRET]}, r'\["pub"\] sets both'),
        ({"TOKEN": ""}, r'\["pub"\]\["TOKEN"\]'),
        ({"TOKEN": "two words"}, r'\["pub"\]\["TOKEN"\]'),
        ({"TOKEN": 5}, r'\["pub"\]\["TOKEN"\]'),
    ],
)
def test_source_secret_and_token_of_the_wrong_shape_raise_config_error(options, named):
    with toot(SOURCES={"pub": {**PUBLISHER, **options}}), pytest.raises(ConfigError, match=named):
        conf.SOURCES  # noqa: B018


@pytest.mark.parametrize(
    ("channel", "source"),
    [
        ("org.example.pub.users.v1", "pub"),
        ("org.example.pub.payments.users.v1", "payments"),
        ("org.example.pub.payments", "payments"),
        ("org.example.other.v1", "example"),
        ("com.elsewhere.v1", None),
        ("org.example.pu", "example"),
    ],
)
def test_the_source_of_a_channel_is_the_longest_matching_prefix(channel, source):
    sources = {
        "example": {**PUBLISHER, "CHANNEL_PREFIX": "org.example."},
        "payments": {**PUBLISHER, "CHANNEL_PREFIX": "org.example.pub.payments"},
        "pub": PUBLISHER,
    }
    with toot(SOURCES=sources):
        found = conf.source_for_channel(channel)
    assert (found.name if found else None) == source


def test_an_empty_prefix_is_the_source_of_any_channel_no_other_claims():
    sources = {"all": {**PUBLISHER, "CHANNEL_PREFIX": ""}, "pub": PUBLISHER}
    with toot(SOURCES=sources):
        found = [conf.source_for_channel(c) for c in ("com.elsewhere.v1", "org.example.pub.x.v1")]
    assert [source.name if source else None for source in found] == ["all", "pub"]


# ALLOWED_CALLBACK_HOSTS and ALLOWED_CALLBACK_NETWORKS (the SSRF guard's allow-lists)


def test_allow_lists_default_to_empty():
    with override_settings(TOOT={}):
        assert conf.ALLOWED_CALLBACK_HOSTS == ()
        assert conf.ALLOWED_CALLBACK_NETWORKS == ()


def test_allowed_callback_hosts_are_normalised():
    hosts = ["Hooks.Internal", ".corp.example", "10.1.2.3", "[::1]", "localhost."]
    with toot(ALLOWED_CALLBACK_HOSTS=hosts):
        normalised = conf.ALLOWED_CALLBACK_HOSTS
    with toot(ALLOWED_CALLBACK_HOSTS=("hooks.internal",)):
        from_a_tuple = conf.ALLOWED_CALLBACK_HOSTS
    assert normalised == (
        "hooks.internal",
        ".corp.example",
        "10.1.2.3",
        "::1",
        "localhost.",
    )
    assert from_a_tuple == ("hooks.internal",)


def test_allowed_callback_networks_are_parsed():
    with toot(ALLOWED_CALLBACK_NETWORKS=["10.0.0.0/8", "fd00::/8", "192.168.1.7", "10.1.2.3/8"]):
        networks = conf.ALLOWED_CALLBACK_NETWORKS
    assert networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("10.0.0.0/8"),  # host bits are dropped
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ALLOWED_CALLBACK_HOSTS", "localhost"),  # a string, not a list of them
        ("ALLOWED_CALLBACK_HOSTS", None),
        ("ALLOWED_CALLBACK_HOSTS", ["http://hooks.internal"]),
        ("ALLOWED_CALLBACK_HOSTS", ["hooks.internal:8000"]),
        ("ALLOWED_CALLBACK_HOSTS", ["hooks.internal/cb"]),
        ("ALLOWED_CALLBACK_HOSTS", ["user@hooks.internal"]),
        ("ALLOWED_CALLBACK_HOSTS", ["*"]),
        ("ALLOWED_CALLBACK_HOSTS", [""]),
        ("ALLOWED_CALLBACK_HOSTS", ["hooks internal"]),
        ("ALLOWED_CALLBACK_HOSTS", [5]),
        ("ALLOWED_CALLBACK_NETWORKS", "10.0.0.0/8"),
        ("ALLOWED_CALLBACK_NETWORKS", None),
        ("ALLOWED_CALLBACK_NETWORKS", ["10.0.0.0/33"]),
        ("ALLOWED_CALLBACK_NETWORKS", ["intranet"]),
        ("ALLOWED_CALLBACK_NETWORKS", [""]),
        ("ALLOWED_CALLBACK_NETWORKS", [10]),
    ],
)
def test_invalid_allow_list_raises_config_error_naming_the_key(key, value):
    with toot(**{key: value}), pytest.raises(ConfigError, match=rf'TOOT\["{key}"\]'):
        getattr(conf, key)


# Values are kept from their first read until a setting changes.


def test_a_value_is_kept_until_django_says_a_setting_changed(monkeypatch):
    assert conf.READ_TIMEOUT == 15.0
    monkeypatch.setattr(settings, "TOOT", {**settings.TOOT, "READ_TIMEOUT": 2.0})
    assert conf.READ_TIMEOUT == 15.0  # a patch Django sends no setting_changed for
    with override_settings(TOOT={**settings.TOOT, "READ_TIMEOUT": 3.0}):
        assert conf.READ_TIMEOUT == 3.0
    assert conf.READ_TIMEOUT == 2.0  # the patched setting, read again as override ended


def test_a_bad_value_is_not_kept():
    with toot(CONNECT_TIMEOUT="soon"):
        for _ in range(2):
            with pytest.raises(ConfigError, match="CONNECT_TIMEOUT"):
                _ = conf.CONNECT_TIMEOUT


def test_a_value_read_while_the_settings_are_forgotten_is_not_kept():
    class Racing(Settings):
        @setting
        def KEY_PREFIX(self: Settings) -> str:  # noqa: N802 - as Settings names them
            value = self.get("KEY_PREFIX")
            self.forget()  # another thread's override_settings, as this one reads
            return str(value)

    racing = Racing()
    assert settings.TOOT["KEY_PREFIX"] == racing.KEY_PREFIX
    assert "KEY_PREFIX" not in racing._values
