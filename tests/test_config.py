"""Configuration: defaults, mailer.toml, --config / MAILER_CONFIG, MAILER_* env, errors, secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailer.config import DEFAULT_VENDOR_ORDER, Settings, load_settings
from mailer.errors import ConfigError

SECRETS = ("mg-SECRET-123", "sp-SECRET-456", "PASSW0RD-789", "AKIA-SECRET", "aws-SECRET-ACCESS")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MAILER_* variable of the caller's shell and no mailer.toml of the repository."""
    for name in list(os.environ):
        if name.upper().startswith("MAILER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_point_at_local_services() -> None:
    s = load_settings()
    assert s.source == "built-in defaults"
    assert (s.beanstalkd.host, s.beanstalkd.port) == ("127.0.0.1", 11300)
    assert s.mongodb.uri.get_secret_value() == "mongodb://127.0.0.1:27017/mailer"
    assert s.beanstalkd.tube == "mailer"
    assert s.mongodb.collection == "mails"
    # The test tube and collections are separate from the production ones.
    assert s.test.tube != s.beanstalkd.tube
    assert s.test.collection != s.mongodb.collection
    assert s.env == "development" and not s.production
    assert s.measure_throughput is False
    assert s.vendor_order() == list(DEFAULT_VENDOR_ORDER)


def test_mailer_toml_in_cwd_overrides_defaults(isolated: Path) -> None:
    write(
        isolated / "mailer.toml",
        'measure_throughput = true\n[beanstalkd]\nport = 11999\ntube = "filetube"\n'
        '[mongodb]\ncollection = "file_mails"\n',
    )
    s = load_settings()
    assert s.source == "mailer.toml"
    assert s.measure_throughput is True
    assert s.beanstalkd.port == 11999
    assert s.beanstalkd.tube == "filetube"
    assert s.beanstalkd.host == "127.0.0.1"  # not in the file: default kept
    assert s.mongodb.collection == "file_mails"


def test_named_file_beats_cwd_config(isolated: Path) -> None:
    write(isolated / "mailer.toml", "[beanstalkd]\nport = 11111\n")
    other = write(isolated / "other.toml", "[beanstalkd]\nport = 12222\n")
    assert load_settings(other).beanstalkd.port == 12222
    assert load_settings().beanstalkd.port == 11111


def test_missing_named_file_is_a_config_error(isolated: Path) -> None:
    missing = isolated / "nope" / "mailer.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing)
    assert str(missing) in str(info.value)
    assert "not found" in str(info.value)


def test_mailer_config_env_names_the_file(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(isolated / "env.toml", '[beanstalkd]\ntube = "from_env_file"\n')
    monkeypatch.setenv("MAILER_CONFIG", str(path))
    s = load_settings()
    assert s.beanstalkd.tube == "from_env_file"
    assert s.source == str(path)
    monkeypatch.setenv("MAILER_CONFIG", str(isolated / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone\.toml"):
        load_settings()


def test_unknown_key_names_file_and_key(isolated: Path) -> None:
    path = write(isolated / "c.toml", "[beanstalkd]\nprot = 11300\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "beanstalkd.prot" in msg
    assert "unknown key" in msg


def test_unknown_top_level_key(isolated: Path) -> None:
    path = write(isolated / "c.toml", "colour = 'blue'\n")
    with pytest.raises(ConfigError, match="'colour': unknown key"):
        load_settings(path)


def test_reserved_internal_key_in_file_is_refused(isolated: Path) -> None:
    path = write(isolated / "c.toml", "source = 'x'\n")
    with pytest.raises(ConfigError, match="'source': unknown key"):
        load_settings(path)


def test_invalid_toml_names_the_file(isolated: Path) -> None:
    path = write(isolated / "c.toml", "[beanstalkd\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value) and "TOML" in str(info.value)


def test_wrong_type_names_key_and_expectation(isolated: Path) -> None:
    path = write(isolated / "c.toml", '[beanstalkd]\nport = "eleven"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "beanstalkd.port" in msg
    assert "valid integer" in msg


def test_out_of_range_value_names_the_bound(isolated: Path) -> None:
    path = write(isolated / "c.toml", "[beanstalkd]\nport = 70000\n")
    with pytest.raises(ConfigError, match=r"beanstalkd\.port.*less than or equal to 65535"):
        load_settings(path)


def test_missing_required_vendor_key(isolated: Path) -> None:
    path = write(isolated / "c.toml", '[vendors.mailgun]\napi_key = "mg-SECRET-123"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "vendors.mailgun.domain" in str(info.value)
    assert "required" in str(info.value)
    assert "mg-SECRET-123" not in str(info.value)


def test_env_beats_the_file(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(isolated / "mailer.toml", '[beanstalkd]\nport = 11999\ntube = "filetube"\n')
    monkeypatch.setenv("MAILER_BEANSTALKD__PORT", "12345")
    monkeypatch.setenv("MAILER_ENV", "production")
    monkeypatch.setenv("MAILER_MEASURE_THROUGHPUT", "true")
    s = load_settings()
    assert s.beanstalkd.port == 12345
    assert s.beanstalkd.tube == "filetube"  # the rest of the file's section is kept
    assert s.env == "production" and s.production
    assert s.measure_throughput is True


@pytest.mark.parametrize(
    ("value", "env"),
    [("production", "production"), ("Production", "production"), (" PRODUCTION ", "production"),
     ("test", "test"), ("TEST", "test"), ("Development", "development")],
)  # fmt: skip
def test_env_accepts_the_three_names_in_any_case(
    monkeypatch: pytest.MonkeyPatch, value: str, env: str
) -> None:
    monkeypatch.setenv("MAILER_ENV", value)
    s = load_settings()
    assert s.env == env
    assert s.production is (env == "production")


@pytest.mark.parametrize("value", ["prod", "staging", "", "live", "productionn"])
def test_any_other_env_stops_with_one_line_naming_it(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    # 'prod' used to run simulated and record the mails as sent: a typo must stop start-up.
    monkeypatch.setenv("MAILER_ENV", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "\n" not in msg
    assert f"MAILER_ENV={value!r}" in msg
    for accepted in ("development", "test", "production"):
        assert accepted in msg


def test_env_in_the_file_is_checked_alike(isolated: Path) -> None:
    assert load_settings(write(isolated / "c.toml", 'env = "Production"\n')).production
    with pytest.raises(ConfigError, match=r"'prod'.*development, test, production"):
        load_settings(write(isolated / "c.toml", 'env = "prod"\n'))


def test_a_foreign_config_toml_in_cwd_is_ignored(isolated: Path) -> None:
    # Another application's config.toml (here a pyproject-like one) is not ours to read.
    write(isolated / "config.toml", '[tool]\nname = "someone else"\n[beanstalkd]\nport = 1\n')
    s = load_settings()
    assert s.source == "built-in defaults"
    assert s.beanstalkd.port == 11300


def test_lookup_order_explicit_path_then_env_then_cwd(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(isolated / "mailer.toml", "[beanstalkd]\nport = 11111\n")
    named = write(isolated / "named.toml", "[beanstalkd]\nport = 12222\n")
    by_env = write(isolated / "env.toml", "[beanstalkd]\nport = 13333\n")
    assert load_settings().beanstalkd.port == 11111
    monkeypatch.setenv("MAILER_CONFIG", str(by_env))
    assert load_settings().beanstalkd.port == 13333
    assert load_settings(named).beanstalkd.port == 12222


@pytest.mark.parametrize(
    "uri", ["http://u:PASSW0RD-789@db.example.com/x", "PASSW0RD-789", "mongo://h/db", "   "]
)
def test_mongodb_uri_with_a_bad_scheme_is_a_config_error(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.setenv("MAILER_MONGODB__URI", uri)
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "mongodb.uri" in msg and "mongodb://" in msg and "mongodb+srv://" in msg
    assert "PASSW0RD-789" not in msg and "\n" not in msg


def test_mongodb_srv_uri_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_MONGODB__URI", "mongodb+srv://u:p@cluster.example.com/db")
    assert load_settings().mongodb.uri.get_secret_value().startswith("mongodb+srv://")


def test_wrong_type_in_env_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_BEANSTALKD__PORT", "abc")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "beanstalkd.port" in str(info.value)
    assert "valid integer" in str(info.value)


def test_unknown_nested_env_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_BEANSTALKD__PROT", "11300")
    with pytest.raises(ConfigError, match=r"beanstalkd\.prot"):
        load_settings()


def test_unparsable_complex_env_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A list or section given through the environment must be JSON; anything else is a
    # start-up ConfigError naming the key, not a raw pydantic-settings exception.
    monkeypatch.setenv("MAILER_VENDORS__ORDER", "mailgun,amazon")
    with pytest.raises(ConfigError, match="vendors"):
        load_settings()


def test_env_list_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_VENDORS__ORDER", '["sparkpost", "amazon"]')
    assert load_settings().vendor_order() == ["sparkpost", "amazon"]


SECRET_FILE = """
[mongodb]
uri = "mongodb://mailer:PASSW0RD-789@db.example.com:27017/mailer"
[vendors.amazon]
region = "eu-west-1"
access_key_id = "AKIA-SECRET"
secret_access_key = "aws-SECRET-ACCESS"
[vendors.mailgun]
domain = "mg.example.com"
api_key = "mg-SECRET-123"
[vendors.sparkpost]
api_key = "sp-SECRET-456"
"""


def test_secrets_never_in_repr_or_str(isolated: Path) -> None:
    s = load_settings(write(isolated / "c.toml", SECRET_FILE))
    # The values are there ...
    assert s.vendors.mailgun is not None and s.vendors.mailgun.api_key.get_secret_value() == "mg-SECRET-123"
    assert "PASSW0RD-789" in s.mongodb.uri.get_secret_value()
    # ... but never shown.
    for text in (repr(s), str(s), repr(s.vendors), str(s.mongodb), repr(s.for_test("_x"))):
        for secret in SECRETS:
            assert secret not in text


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('region = "eu-west-1"', 'region = "eu-west-1"\ntimeout_s = "slow"', "vendors.amazon.timeout_s"),
        ('domain = "mg.example.com"', "domain = 42", "vendors.mailgun.domain"),
        (
            'api_key = "sp-SECRET-456"',
            'api_key = "sp-SECRET-456"\nbase_url = 7',
            "vendors.sparkpost.base_url",
        ),
        ("[mongodb]", '[mongodb]\ntimeout_ms = "soon"', "mongodb.timeout_ms"),
    ],
)
def test_secrets_never_in_config_errors(isolated: Path, old: str, new: str, key: str) -> None:
    # A wrong type right next to the secrets: the message names the key, never a value.
    assert SECRET_FILE.count(old) == 1
    with pytest.raises(ConfigError) as info:
        load_settings(write(isolated / "c.toml", SECRET_FILE.replace(old, new)))
    msg = str(info.value)
    assert key in msg
    for secret in SECRETS:
        assert secret not in msg
        assert secret not in repr(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_secret_of_wrong_type_is_not_echoed(isolated: Path) -> None:
    path = write(isolated / "c.toml", '[vendors.sparkpost]\napi_key = ["sp-SECRET-456"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "vendors.sparkpost.api_key" in str(info.value)
    assert "valid string" in str(info.value)
    assert "sp-SECRET-456" not in str(info.value)


def test_secret_in_env_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_MONGODB__URI", "mongodb://u:PASSW0RD-789@h/db")
    monkeypatch.setenv("MAILER_MONGODB__TIMEOUT_MS", "never")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "mongodb.timeout_ms" in str(info.value)
    assert "PASSW0RD-789" not in str(info.value)


def test_vendor_order_follows_file_sections(isolated: Path) -> None:
    path = write(
        isolated / "c.toml",
        '[vendors.sparkpost]\napi_key = "sp-SECRET-456"\n'
        '[vendors.mailgun]\ndomain = "mg.example.com"\napi_key = "mg-SECRET-123"\n'
        '[vendors.sendinblue]\napi_key = "sb"\n',
    )
    s = load_settings(path)
    assert s.vendor_order() == ["sparkpost", "mailgun", "sendinblue"]


def test_vendor_order_key_wins(isolated: Path) -> None:
    path = write(
        isolated / "c.toml",
        '[vendors]\norder = ["mailgun", "sparkpost", "mailgun"]\n'
        '[vendors.sparkpost]\napi_key = "sp"\n'
        '[vendors.mailgun]\ndomain = "mg.example.com"\napi_key = "mg"\n',
    )
    assert load_settings(path).vendor_order() == ["mailgun", "sparkpost"]


def test_vendor_order_rejects_unknown_vendor(isolated: Path) -> None:
    path = write(isolated / "c.toml", '[vendors]\norder = ["mailgun", "postmark"]\n')
    with pytest.raises(ConfigError, match=r"vendors\.order\.1"):
        load_settings(path)


def test_unknown_vendor_section(isolated: Path) -> None:
    path = write(isolated / "c.toml", '[vendors.postmark]\napi_key = "x"\n')
    with pytest.raises(ConfigError, match=r"vendors\.postmark': unknown key"):
        load_settings(path)


def test_for_test_switches_tube_and_collections() -> None:
    s = load_settings()
    t = s.for_test()
    assert t.beanstalkd.tube == s.test.tube
    assert t.mongodb.collection == s.test.collection
    assert t.mongodb.vendor_status_collection == s.test.vendor_status_collection
    assert t.beanstalkd.port == s.beanstalkd.port  # only the names change
    assert t.mongodb.uri.get_secret_value() == s.mongodb.uri.get_secret_value()
    u = s.for_test("_abc")
    assert u.beanstalkd.tube == s.test.tube + "_abc"
    assert u.mongodb.collection == s.test.collection + "_abc"
    assert u.mongodb.vendor_status_collection == s.test.vendor_status_collection + "_abc"
    # The original is untouched (frozen settings, copies).
    assert s.beanstalkd.tube == "mailer" and s.mongodb.collection == "mails"


def test_load_settings_test_flag(isolated: Path) -> None:
    write(
        isolated / "mailer.toml",
        '[beanstalkd]\ntube = "prod_tube"\n[test]\ntube = "ci_tube"\ncollection = "ci_mails"\n',
    )
    s = load_settings(test=True)
    assert s.beanstalkd.tube == "ci_tube"
    assert s.mongodb.collection == "ci_mails"
    assert load_settings().beanstalkd.tube == "prod_tube"


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(Exception, match="frozen"):
        s.beanstalkd.port = 1  # type: ignore[misc]
    assert isinstance(s, Settings)


def test_vendor_order_names_the_known_vendors_from_the_table(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILER_VENDORS__ORDER", '["smtp", "postmark"]')
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "key 'vendors.order.1'" in message, message
    assert "unknown vendor 'postmark'; known: amazon, mailgun, sendinblue, sparkpost, smtp" in message


def test_a_vendor_section_is_found_by_its_table_name(isolated: Path) -> None:
    path = write(isolated / "c.toml", '[vendors.smtp]\nhost = "relay.example.com"\n')
    vendors = load_settings(path).vendors
    assert vendors.configured() == ["smtp"]
    smtp = vendors.section("smtp")
    assert smtp is not None and smtp.model_dump()["host"] == "relay.example.com"
    assert vendors.section("mailgun") is None and vendors.section("order") is None
