from __future__ import annotations

import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from django.conf import settings
from django.core.checks import ERROR, WARNING
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings
from django.urls import include, path

import toot
from tests.utils import toot_settings
from toot.checks import check_celery, check_security, check_settings, check_subscriptions
from toot.conf import DEFAULTS

pytestmark = pytest.mark.usefixtures("no_drain_at_work")

SOURCE = settings.TOOT["SOURCES"]["publisher"]


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
        ("PROXY_URL", "socks5://proxy.internal:1080"),
        ("CA_BUNDLE", "/nonexistent/ca.pem"),
        ("CLIENT_CERT", ["/nonexistent/cert.pem", "/nonexistent/key.pem"]),
        ("KEY_PREFIX", None),
        ("CONNECT_TIMEOUT", "5"),
        ("READ_TIMEOUT", 0),
        ("REDIS_TIMEOUT", -1),
        ("MAX_EVENT_BYTES", "256k"),
        ("RETRY_SCHEDULE", [1, -5]),
        ("SIGNING_SECRETS", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ("SUBSCRIPTIONS_AUTH", {"TOKENS": []}),
        ("SUBSCRIPTIONS_AUTH", "tests.no_such_module.authorize"),
        ("REDIS_CONNECTION", "tests.no_such_module.client"),
        ("PROXY_URL", "proxy.internal:3128"),
        ("MAX_DRAINS", 0),
        ("MAX_DRAINS", 1.5),
        ("MAX_DRAINS", True),
        ("MAX_DRAINS", "4"),
        ("BATCH", "yes"),
        ("BATCH", 1),
        ("BATCH", None),
        ("BATCH_MAX_EVENTS", 0),
        ("BATCH_MAX_EVENTS", 2.5),
        ("BATCH_MAX_EVENTS", True),
        ("ALLOW_REDIS_IN_TESTS", "yes"),
        ("ALLOW_REDIS_IN_TESTS", 1),
    ],
)
def test_e002_wrong_type(key, value):
    with toot_settings(**{key: value}):
        [message] = check_settings()
    assert message.id == "toot.E002"
    assert message.level == ERROR
    assert f'TOOT["{key}"]' in message.msg


@pytest.mark.parametrize(
    "options",
    [
        {"MAX_DRAINS": 1, "BATCH": False, "BATCH_MAX_EVENTS": 1},
        {"MAX_DRAINS": 64, "BATCH": True, "BATCH_MAX_EVENTS": 10_000},
        {"MAX_DRAINS": 2.0, "BATCH_MAX_EVENTS": 50.0},
    ],
)
def test_queue_and_batch_settings_in_range_pass(options):
    with toot_settings(**options):
        assert run_checks() == []


def test_check_command_reports_a_bad_batch_setting():
    with toot_settings(BATCH="yes"), pytest.raises(SystemCheckError, match=r'TOOT\["BATCH"\]'):
        call_command("check", stdout=StringIO(), stderr=StringIO())


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


# toot.W008


def other_handler(event):
    pass


def test_w008_a_handler_subscribed_with_two_celery_queues():
    toot.subscribe("publisher", "users.updated.v1", handler, queue="slow")
    toot.subscribe("publisher", "users.deleted.v1", handler)
    toot.subscribe("publisher", "users.deleted.v1", other_handler, queue="slow")

    [message] = check_subscriptions()
    assert message.id == "toot.W008"
    assert message.level == WARNING
    assert message.obj == "tests.test_checks.handler"
    assert "'slow', None" in message.msg


def test_w008_not_for_a_handler_given_one_queue_on_every_channel():
    toot.subscribe("publisher", "users.updated.v1", handler, queue="slow")
    toot.subscribe("publisher", "users.deleted.v1", handler, queue="slow")

    assert check_subscriptions() == []


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
        # From the environment: os.environ reads bytes that are not UTF-8 as lone surrogates.
        "https://sub.example/toot/callbacks\udcff",
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


# TLS files that exist but do not load (toot.E002)


@pytest.fixture(scope="module")
def issued():
    return trustme.CA().issue_cert("publisher.example")


@pytest.fixture
def pem(tmp_path, issued):
    """Writes PEM files under tmp_path: pem("name", blob) is the path of one."""

    def write(name, blob):
        path = tmp_path / name
        blob.write_to_path(str(path)) if hasattr(blob, "write_to_path") else path.write_bytes(blob)
        return str(path)

    return write


def test_tls_files_that_load_pass(pem, issued):
    cert = pem("cert.pem", issued.cert_chain_pems[0])
    key = pem("key.pem", issued.private_key_pem)
    both = pem("both.pem", issued.private_key_and_cert_chain_pem)
    for options in [
        {"CA_BUNDLE": cert, "CLIENT_CERT": [cert, key]},
        {"CA_BUNDLE": str(Path(cert).parent), "CLIENT_CERT": both},
    ]:
        with toot_settings(**options):
            assert check_settings() == []


def test_e002_a_ca_bundle_that_is_not_pem(pem):
    with toot_settings(CA_BUNDLE=pem("ca.pem", b"not a certificate\n")):
        [message] = check_settings()
    assert message.id == "toot.E002"
    assert message.msg.startswith('TOOT["CA_BUNDLE"] cannot be loaded: ')
    assert message.hint


def test_e002_a_client_key_that_is_not_the_certificates(pem, issued):
    other_key = trustme.CA().issue_cert("other.example").private_key_pem
    cert, key = pem("cert.pem", issued.cert_chain_pems[0]), pem("key.pem", other_key)
    with toot_settings(CLIENT_CERT=[cert, key]):
        [message] = check_settings()
    assert message.id == "toot.E002"
    assert message.msg.startswith('TOOT["CLIENT_CERT"] cannot be loaded: ')


def test_e002_an_encrypted_client_key_fails_instead_of_prompting(pem, issued):
    private_key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    encrypted = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret"),
    )
    cert, key = pem("cert.pem", issued.cert_chain_pems[0]), pem("key.pem", encrypted)
    with toot_settings(CLIENT_CERT=[cert, key]):
        [message] = check_settings()
    assert message.id == "toot.E002"
    assert 'TOOT["CLIENT_CERT"]' in message.msg


# toot.E008: a setting toot no longer reads


def test_e008_http_session_says_what_to_use_instead():
    with toot_settings(HTTP_SESSION="myproject.http.session"):
        [message] = check_settings()
    assert message.id == "toot.E008"
    assert message.level == ERROR
    assert 'TOOT["HTTP_SESSION"] is no longer supported' in message.msg
    assert message.hint is not None
    for setting in ("PROXY_URL", "CA_BUNDLE", "CLIENT_CERT"):
        assert f'TOOT["{setting}"]' in message.hint


def test_e008_set_to_none_is_still_an_error():
    with toot_settings(HTTP_SESSION=None):
        assert ids(check_settings()) == ["toot.E008"]


def test_check_command_reports_e008():
    with (
        toot_settings(HTTP_SESSION="myproject.http.session"),
        pytest.raises(SystemCheckError, match="toot.E008"),
    ):
        call_command("check", stdout=StringIO(), stderr=StringIO())


# toot.W001 and toot.W002


def test_w001_unknown_toot_key():
    with toot_settings(CHANEL_PREFIX="org.example."):
        [message] = check_settings()
    assert message.id == "toot.W001"
    assert message.level == WARNING
    assert 'TOOT["CHANEL_PREFIX"]' in message.msg
    assert message.hint is not None
    assert "CHANNEL_PREFIX" in message.hint


def test_w002_unknown_source_key():
    with with_source(CHANNEL="org.example.publisher."):
        [message] = check_settings()
    assert message.id == "toot.W002"
    assert message.level == WARNING
    assert 'TOOT["SOURCES"]["publisher"]["CHANNEL"]' in message.msg
    assert message.hint is not None
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


# toot.E007

GOOD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SHORT_SECRET = "whsec_c2hvcnRzZWNyZXQ="  # "shortsecret": 11 bytes


@pytest.mark.parametrize(
    ("options", "named", "error"),
    [
        (
            {"SIGNING_SECRETS": [GOOD_SECRET, SHORT_SECRET]},
            'TOOT["SIGNING_SECRETS"][1]',
            "at least 24 random bytes",
        ),
        (
            {"SIGNING_SECRETS": ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]},
            'TOOT["SIGNING_SECRETS"][0]',
            'start with "whsec_"',
        ),
        (
            {"SOURCES": {"publisher": {**SOURCE, "SECRET": "whsec_!!not-base64!!"}}},
            'TOOT["SOURCES"]["publisher"]["SECRET"]',
            "standard base64",
        ),
        (
            {"SOURCES": {"publisher": {**SOURCE, "SECRETS": [GOOD_SECRET, SHORT_SECRET]}}},
            'TOOT["SOURCES"]["publisher"]["SECRETS"][1]',
            "at least 24 random bytes",
        ),
        (  # SECRET from env("...", default=None): None is unset, SECRETS is what counts
            {"SOURCES": {"publisher": {**SOURCE, "SECRET": None, "SECRETS": [GOOD_SECRET, "x"]}}},
            'TOOT["SOURCES"]["publisher"]["SECRETS"][1]',
            'start with "whsec_"',
        ),
    ],
)
def test_e007_malformed_secret(options, named, error):
    with toot_settings(**options):
        [message] = check_settings()
    assert message.id == "toot.E007"
    assert message.level == ERROR
    assert named in message.msg
    assert error in message.msg
    assert "whsec_" in (message.hint or "")
    assert "c2hvcnRzZWNyZXQ" not in message.msg  # the secret itself is never shown


def test_e007_each_bad_secret_reported():
    with toot_settings(
        SIGNING_SECRETS=[SHORT_SECRET, "x"],
        SOURCES={"publisher": {**SOURCE, "SECRET": SHORT_SECRET}},
    ):
        assert ids(check_settings()) == ["toot.E007"] * 3


def test_well_formed_secrets_and_tokens_pass():
    with toot_settings(
        SIGNING_SECRETS=[GOOD_SECRET, GOOD_SECRET.rstrip("w") + "x"],
        SUBSCRIPTIONS_AUTH={"TOKENS": ["t0ken"]},
        SOURCES={"publisher": {**SOURCE, "SECRETS": [GOOD_SECRET], "TOKEN": "t0ken"}},
    ):
        assert run_checks() == []


def test_a_secret_set_to_none_is_no_secret():
    with with_source(SECRET=None):
        assert check_settings() == []


def test_secret_and_token_are_known_source_keys():
    with with_source(SECRET=GOOD_SECRET, TOKEN="t0ken"):
        assert check_settings() == []


# toot.W003


def test_w003_open_subscriptions_endpoint_without_debug():
    with override_settings(DEBUG=False):
        [message] = check_security()
    assert message.id == "toot.W003"
    assert message.level == WARNING
    assert "subscriptions endpoint is open" in message.msg
    assert 'TOOT["SUBSCRIPTIONS_AUTH"]' in (message.hint or "")


@pytest.mark.parametrize(
    ("debug", "auth"),
    [
        (True, None),
        (False, {"TOKENS": ["t0ken"]}),
        (False, "tests.test_checks.handler"),
    ],
)
def test_no_w003_in_debug_or_with_authentication(debug, auth):
    with override_settings(DEBUG=debug), toot_settings(SUBSCRIPTIONS_AUTH=auth):
        assert check_security() == []


class CallbacksOnlyURLConf:
    """A subscriber-only project's URLconf: the callbacks endpoint mounted alone."""

    urlpatterns = [path("toot/", include("toot.urls.callbacks"))]


def test_no_w003_when_the_subscriptions_endpoint_is_not_served():
    with override_settings(DEBUG=False, ROOT_URLCONF=CallbacksOnlyURLConf):
        assert check_security() == []


def test_no_w003_when_subscriptions_auth_is_malformed():
    with toot_settings(SUBSCRIPTIONS_AUTH=5):
        assert check_security() == []
        assert ids(check_settings()) == ["toot.E002"]  # reported once, there


def test_check_command_runs_check_security():
    with (
        override_settings(SILENCED_SYSTEM_CHECKS=[]),
        pytest.raises(SystemCheckError, match=r"toot\.W003"),
    ):
        call_command("check", fail_level="WARNING", stdout=StringIO(), stderr=StringIO())


# The SSRF guard's allow-lists: toot.E002 and toot.W004


@pytest.mark.parametrize(
    ("key", "value"),
    [("ALLOWED_CALLBACK_HOSTS", "localhost"), ("ALLOWED_CALLBACK_NETWORKS", ["intranet"])],
)
def test_e002_bad_allow_list(key, value):
    with toot_settings(**{key: value}):
        [message] = check_settings()
    assert message.id == "toot.E002"
    assert f'TOOT["{key}"]' in message.msg


@pytest.mark.parametrize(
    ("network", "reached"),
    [
        ("169.254.0.0/16", "169.254.169.254"),
        ("169.254.169.254/32", "169.254.169.254"),
        ("0.0.0.0/0", "169.254.169.254"),
        ("fd00::/8", "fd00:ec2::254"),
        ("::/0", "fd00:ec2::254"),
        ("100.64.0.0/10", "100.100.100.200"),
    ],
)
def test_w004_allowed_network_reaches_cloud_metadata(network, reached):
    with toot_settings(ALLOWED_CALLBACK_NETWORKS=["10.0.0.0/8", network]):
        [message] = check_settings()
    assert message.id == "toot.W004"
    assert message.level == WARNING
    assert network in message.msg
    assert reached in message.msg
    assert "ALLOWED_CALLBACK_HOSTS" in str(message.hint)


def test_private_networks_that_miss_the_metadata_addresses_are_fine():
    networks = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "fd12::/16"]
    with toot_settings(ALLOWED_CALLBACK_NETWORKS=networks, ALLOWED_CALLBACK_HOSTS=["x.internal"]):
        assert check_settings() == []


def test_check_command_reports_w004():
    with (
        toot_settings(ALLOWED_CALLBACK_NETWORKS=["0.0.0.0/0"]),
        pytest.raises(SystemCheckError, match=r"toot\.W004"),
    ):
        call_command("check", fail_level="WARNING", stdout=StringIO(), stderr=StringIO())


# Dedupe: toot.W005


def test_w005_dedupe_ttl_shorter_than_the_retry_window():
    with toot_settings(RETRY_SCHEDULE=[60, 600], DEDUPE_TTL=600):
        [message] = run_checks()
    assert message.id == "toot.W005"
    assert "792 s" in message.msg  # (60 + 600) x 1.2, the longest jittered window


def test_w005_quiet_in_a_project_that_subscribes_to_no_source():
    """A publisher alone keeps no done marks: DEDUPE_TTL means nothing to it."""
    with toot_settings(RETRY_SCHEDULE=[60, 600], DEDUPE_TTL=600, SOURCES={}):
        assert "toot.W005" not in ids(run_checks())


def test_w005_quiet_when_the_ttl_outlasts_the_retries():
    with toot_settings(RETRY_SCHEDULE=[60, 600], DEDUPE_TTL=792):
        assert "toot.W005" not in ids(run_checks())


def test_w005_default_ttl_outlasts_the_default_schedule():
    with toot_settings(
        RETRY_SCHEDULE=DEFAULTS["RETRY_SCHEDULE"], DEDUPE_TTL=DEFAULTS["DEDUPE_TTL"]
    ):
        assert "toot.W005" not in ids(run_checks())


# Lease: toot.W007


def test_w007_a_delivery_that_could_outlive_its_drains_lease():
    with toot_settings(CONNECT_TIMEOUT=5, READ_TIMEOUT=30, LEASE_SECONDS=40):
        [message] = run_checks()
    assert message.id == "toot.W007"
    assert "(35 s) is over three quarters of" in message.msg
    assert 'TOOT["LEASE_SECONDS"] (40 s)' in message.msg


def test_w007_quiet_with_the_defaults():
    with toot_settings(
        CONNECT_TIMEOUT=DEFAULTS["CONNECT_TIMEOUT"],
        READ_TIMEOUT=DEFAULTS["READ_TIMEOUT"],
        LEASE_SECONDS=DEFAULTS["LEASE_SECONDS"],
    ):
        assert "toot.W007" not in ids(run_checks())


# Sender threads: toot.W009


def test_w009_senders_no_more_than_one_url_may_hold():
    with toot_settings(SENDERS=4, MAX_IN_FLIGHT=4):
        [message] = run_checks()
    assert message.id == "toot.W009"
    assert 'TOOT["SENDERS"] (4) is not more than TOOT["MAX_IN_FLIGHT"] (4)' in message.msg


def test_w009_quiet_with_the_defaults():
    assert "toot.W009" not in ids(run_checks())


@pytest.mark.parametrize(
    "setting, value",
    [
        ("MAX_IN_FLIGHT", 0),
        ("BREAKER_FAILURES", 1.5),
        ("BREAKER_SECONDS", -1),
        ("DISABLE_AFTER", "5 days"),
        ("CALLBACK_RATE_LIMIT", 0),
        ("RATE_LIMIT", float("inf")),
    ],
)
def test_e002_the_isolation_settings_must_be_positive(setting, value):
    with toot_settings(**{setting: value}):
        [message] = run_checks()
    assert message.id == "toot.E002" and f'TOOT["{setting}"]' in message.msg


def test_e002_lease_seconds_must_be_a_positive_number():
    with toot_settings(LEASE_SECONDS=0):
        [message] = run_checks()
    assert message.id == "toot.E002"
    assert 'TOOT["LEASE_SECONDS"] must be a positive number' in message.msg


@pytest.mark.parametrize(
    ("encoder", "error"),
    [
        ("json.dumps", "must name a json.JSONEncoder subclass"),
        (None, "must name a json.JSONEncoder subclass"),
        ("tests.nowhere.Encoder", "cannot be imported"),
    ],
)
def test_e002_json_encoder_must_name_an_encoder_class(encoder, error):
    with toot_settings(JSON_ENCODER=encoder):
        [message] = run_checks()
    assert message.id == "toot.E002"
    assert 'TOOT["JSON_ENCODER"]' in message.msg
    assert error in message.msg


# Celery: toot.W006


def test_w006_quiet_where_the_projects_celery_app_is_loaded():
    assert check_celery() == []  # the tests' conftest imports tests.celery


def test_w006_when_celery_falls_back_to_its_default_app(monkeypatch):
    # This process without the tests' app: Celery makes its fallback app, as it does in
    # a project that loads none (the subprocess test below runs one).
    monkeypatch.setattr("celery._state.default_app", None)
    monkeypatch.setattr("celery._state._tls.current_app", None)

    [message] = check_celery()

    assert message.id == "toot.W006"
    assert "from .celery import app as celery_app" in str(message.hint)


def test_w006_in_a_process_that_loads_no_celery_app_of_the_project():
    # As manage.py check runs for a project whose __init__.py does not import its app:
    # nothing of the tests' own (tests/celery.py) is imported by their settings.
    checked = subprocess.run(
        [sys.executable, "-m", "django", "check", "--settings", "tests.settings"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert checked.returncode == 0, checked.stderr  # a warning does not fail the check
    assert "(toot.W006) No Celery app of this project is loaded" in checked.stderr
