from __future__ import annotations

from io import StringIO

import pytest
from django.conf import settings
from django.core.checks import ERROR, WARNING
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

import toot
from toot.checks import check_settings, check_subscriptions

SOURCE = settings.TOOT["SOURCES"]["publisher"]


def toot_settings(**options):
    return override_settings(TOOT={**settings.TOOT, **options})


def with_source(**options):
    """The tests' settings with the publisher source's options changed."""
    return toot_settings(SOURCES={"publisher": {**SOURCE, **options}})


def handler(event):
    pass


def ids(messages):
    return [message.id for message in messages]


def run_checks():
    return check_settings() + check_subscriptions()


def test_tests_settings_pass():
    assert run_checks() == []


def test_tests_settings_pass_with_a_subscription():
    toot.subscribe("publisher", "users.updated.v1", handler)

    assert run_checks() == []


def test_minimal_settings_pass():
    with override_settings(TOOT={"REDIS_URL": settings.TOOT["REDIS_URL"]}):
        assert run_checks() == []


def test_every_message_has_a_hint():
    with toot_settings(
        CHANEL_PREFIX="x.", CALLBACK_URL="ftp://sub.example/cb", CHANNEL_PREFIX="a b"
    ):
        messages = run_checks()
    assert ids(messages) == ["toot.W001", "toot.E005", "toot.E006"]
    assert all(message.hint for message in messages)


# toot.E001


def test_e001_toot_setting_missing():
    with override_settings():
        del settings.TOOT
        [message] = check_settings()
    assert message.id == "toot.E001"
    assert message.level == ERROR
    assert "TOOT setting is missing" in message.msg


@pytest.mark.parametrize("value", [["CHANNEL_PREFIX"], "org.example.", None])
def test_e001_toot_setting_not_a_dict(value):
    with override_settings(TOOT=value):
        [message] = check_settings()
        assert check_subscriptions() == []
    assert message.id == "toot.E001"
    assert "must be a dict" in message.msg


# toot.E002


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CHANNEL_PREFIX", 5),
        ("CALLBACK_URL", ["http://sub.example/toot/callbacks"]),
        ("SOURCES", ["publisher"]),
        ("REDIS_URL", 6379),
        ("REDIS_CONNECTION", True),
        ("HTTP_SESSION", 1),
        ("KEY_PREFIX", None),
        ("CONNECT_TIMEOUT", "5"),
        ("READ_TIMEOUT", 0),
        ("REDIS_TIMEOUT", -1),
        ("MAX_EVENT_BYTES", "256k"),
        ("RETRY_SCHEDULE", [1, -5]),
    ],
)
def test_e002_wrong_type(key, value):
    with toot_settings(**{key: value}):
        [message] = check_settings()
    assert message.id == "toot.E002"
    assert message.level == ERROR
    assert f'TOOT["{key}"]' in message.msg


def test_e002_each_bad_key_reported():
    with toot_settings(CONNECT_TIMEOUT="5", READ_TIMEOUT="15"):
        messages = check_settings()
    assert ids(messages) == ["toot.E002", "toot.E002"]
    assert 'TOOT["CONNECT_TIMEOUT"]' in messages[0].msg
    assert 'TOOT["READ_TIMEOUT"]' in messages[1].msg


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ("https://pub.example/subscriptions", 'TOOT["SOURCES"]["publisher"]'),
        (
            {"CHANNEL_PREFIX": "org.example.publisher."},
            'TOOT["SOURCES"]["publisher"]["SUBSCRIPTION_URL"]',
        ),
        ({**SOURCE, "CHANNEL_PREFIX": None}, 'TOOT["SOURCES"]["publisher"]["CHANNEL_PREFIX"]'),
    ],
)
def test_e002_bad_source(source, named):
    with toot_settings(SOURCES={"publisher": source}):
        [message] = check_settings()
        assert check_subscriptions() == []  # reported once, by check_settings
    assert message.id == "toot.E002"
    assert named in message.msg


# toot.E003


def test_e003_subscriptions_without_callback_url():
    toot.subscribe("publisher", "users.updated.v1", handler)
    raw = {key: value for key, value in settings.TOOT.items() if key != "CALLBACK_URL"}

    with override_settings(TOOT=raw):
        [message] = check_subscriptions()
        assert check_settings() == []
    assert message.id == "toot.E003"
    assert message.level == ERROR
    assert 'TOOT["CALLBACK_URL"]' in message.msg


def test_e003_empty_callback_url():
    toot.subscribe("publisher", "users.updated.v1", handler)

    with toot_settings(CALLBACK_URL=""):
        assert ids(check_subscriptions()) == ["toot.E003"]


def test_no_callback_url_is_fine_without_subscriptions():
    raw = {key: value for key, value in settings.TOOT.items() if key != "CALLBACK_URL"}

    with override_settings(TOOT=raw):
        assert run_checks() == []


# toot.E004


def test_e004_subscription_to_an_undefined_source():
    toot.subscribe("publisher", "users.updated.v1", handler)

    with toot_settings(SOURCES={}):
        [message] = check_subscriptions()
    assert message.id == "toot.E004"
    assert message.level == ERROR
    assert '"publisher"' in message.msg
    assert "users.updated.v1" in message.msg
    assert message.obj is handler


# toot.E005


@pytest.mark.parametrize(
    "url",
    [
        "ftp://sub.example/toot/callbacks",
        "/toot/callbacks",
        "sub.example/toot/callbacks",
        "http://",
        "https://user:secret@sub.example/toot/callbacks",
        "http://sub.example:99999/toot/callbacks",
        "http://[::1/toot/callbacks",
        "http://sub.example/toot/call backs",
        "",
    ],
)
def test_e005_malformed_callback_url(url):
    with toot_settings(CALLBACK_URL=url):
        [message] = check_settings()
    assert message.id == "toot.E005"
    assert message.level == ERROR
    assert 'TOOT["CALLBACK_URL"]' in message.msg
    assert repr(url) in message.msg


@pytest.mark.parametrize("url", ["publisher.example/toot/subscriptions", "unix:///tmp/toot.sock"])
def test_e005_malformed_subscription_url(url):
    with with_source(SUBSCRIPTION_URL=url):
        [message] = check_settings()
    assert message.id == "toot.E005"
    assert 'TOOT["SOURCES"]["publisher"]["SUBSCRIPTION_URL"]' in message.msg


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379/0", "127.0.0.1:6379", "amqp://guest@rabbit.example//", "redis://[::1"],
)
def test_e005_redis_url_scheme(url):
    with toot_settings(REDIS_URL=url):
        [message] = check_settings()
    assert message.id == "toot.E005"
    assert 'TOOT["REDIS_URL"]' in message.msg


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://:pw@redis.example:6380/1", "unix:///tmp/r.sock"]
)
def test_redis_url_schemes_accepted(url):
    with toot_settings(REDIS_URL=url):
        assert check_settings() == []


def test_e005_redis_url_from_an_amqp_broker_is_not_used(monkeypatch):
    monkeypatch.delenv("TOOT_REDIS_URL", raising=False)
    raw = {key: value for key, value in settings.TOOT.items() if key != "REDIS_URL"}

    with override_settings(TOOT=raw, CELERY_BROKER_URL="amqp://guest@rabbit.example//"):
        assert check_settings() == []  # falls back to the default Redis URL


# toot.E006


@pytest.mark.parametrize("prefix", ["org example.", "org.exämple.", "org.example.\n", "org.\x00."])
def test_e006_bad_channel_prefix(prefix):
    with toot_settings(CHANNEL_PREFIX=prefix):
        [message] = check_settings()
    assert message.id == "toot.E006"
    assert message.level == ERROR
    assert 'TOOT["CHANNEL_PREFIX"]' in message.msg


def test_e006_bad_source_channel_prefix():
    with with_source(CHANNEL_PREFIX="org.example publisher."):
        [message] = check_settings()
    assert message.id == "toot.E006"
    assert 'TOOT["SOURCES"]["publisher"]["CHANNEL_PREFIX"]' in message.msg


def test_empty_channel_prefixes_are_fine():
    with toot_settings(CHANNEL_PREFIX="", SOURCES={"publisher": {**SOURCE, "CHANNEL_PREFIX": ""}}):
        assert check_settings() == []


# toot.W001 and toot.W002


def test_w001_unknown_toot_key():
    with toot_settings(CHANEL_PREFIX="org.example."):
        [message] = check_settings()
    assert message.id == "toot.W001"
    assert message.level == WARNING
    assert 'TOOT["CHANEL_PREFIX"]' in message.msg
    assert "CHANNEL_PREFIX" in message.hint


def test_w002_unknown_source_key():
    with with_source(CHANNEL="org.example.publisher."):
        [message] = check_settings()
    assert message.id == "toot.W002"
    assert message.level == WARNING
    assert 'TOOT["SOURCES"]["publisher"]["CHANNEL"]' in message.msg
    assert "SUBSCRIPTION_URL" in message.hint


# The checks are registered with Django's check framework.


def test_check_command_passes_with_the_tests_settings():
    toot.subscribe("publisher", "users.updated.v1", handler)
    out = StringIO()

    call_command("check", stdout=out, stderr=StringIO())

    assert "no issues" in out.getvalue()


def test_check_command_runs_check_settings():
    with toot_settings(CONNECT_TIMEOUT="5"), pytest.raises(SystemCheckError, match=r"toot\.E002"):
        call_command("check", stdout=StringIO(), stderr=StringIO())


def test_check_command_runs_check_subscriptions():
    toot.subscribe("publisher", "users.updated.v1", handler)

    with toot_settings(SOURCES={}), pytest.raises(SystemCheckError, match=r"toot\.E004"):
        call_command("check", stdout=StringIO(), stderr=StringIO())


def test_check_command_reports_warnings():
    with toot_settings(CHANEL_PREFIX="x."), pytest.raises(SystemCheckError, match=r"toot\.W001"):
        call_command("check", fail_level="WARNING", stdout=StringIO(), stderr=StringIO())
