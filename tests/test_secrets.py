"""Secrets in config values are recognised and masked: key names, URL credentials, overrides
and free text (``recsys.tracking``). That none reaches the disk or MLflow from a real run is
tested on the shared reference run in tests/test_reliability.py."""

from __future__ import annotations

import pytest

from recsys.tracking import flatten, is_secret_key, mask_override, mask_secrets, redact, secret_values


@pytest.mark.parametrize(
    "key",
    [
        "password", "db_password", "dbPassword", "PASSWD", "db-pwd", "api_key", "apiKey", "API-KEY", "ApiKey",
        "hf_token", "authToken", "oauth_token", "auth", "client_secret", "clientSecret", "private_key",
        "PrivateKey", "aws_access_key_id", "credentials", "gcp.credential", "ssh_passphrase",
    ],
)  # fmt: skip
def test_credential_key_names_are_secret_in_any_case_and_spelling(key):
    assert is_secret_key(key)
    assert flatten({key: "x"}) == {key: "***"}


@pytest.mark.parametrize("key", ["tokenizer", "author", "max_tokens", "n_tokens", "keyword", "name_or_path", "seed"])
def test_ordinary_keys_are_not_secret(key):
    assert not is_secret_key(key)


def test_url_credentials_are_masked_by_shape_whatever_the_key():
    cfg = {"db": {"url": "postgresql://bob:hunter22@db.local:5432/shop", "plain": "https://example.org/a:b"}}
    assert mask_secrets(cfg) == {"db": {"url": "postgresql://bob:***@db.local:5432/shop", "plain": cfg["db"]["plain"]}}
    assert flatten(cfg)["db.url"] == "postgresql://bob:***@db.local:5432/shop"
    assert mask_secrets({"hosts": ["redis://:pw-1234@cache:6379"]}) == {"hosts": ["redis://:***@cache:6379"]}
    # A password holding @ and / is masked whole, not up to its first @.
    assert mask_secrets("postgres://bob:p@ss/w@rd@db:5432/x") == "postgres://bob:***@db:5432/x"
    assert secret_values("postgres://bob:p@ss/w@rd@db:5432/x") == {"p@ss/w@rd"}


def test_a_subtree_under_a_secret_key_is_masked_whole():
    cfg = {"credentials": {"user": "bob", "key": "k-123"}, "seed": 1}
    assert mask_secrets(cfg) == {"credentials": "***", "seed": 1}
    assert flatten(cfg) == {"credentials": "***", "seed": 1}


def test_overrides_and_free_text_are_redacted():
    cfg = {"service": {"api_token": "tok-123456"}, "db": {"url": "mysql://u:pw-98765@h/x"}}
    hidden = secret_values(cfg)
    assert hidden == {"tok-123456", "pw-98765"}
    assert mask_override("+service.api_token=tok-123456") == "+service.api_token=***"
    assert mask_override("+db.url=mysql://u:pw-98765@h/x") == "+db.url=mysql://u:***@h/x"
    assert mask_override("trainer.max_epochs=3") == "trainer.max_epochs=3"
    assert mask_override("+credentials.key=abc-4567") == "+credentials.key=***"  # under a secret key
    assert secret_values({"credentials": {"key": "abc-4567", "n": [12345]}}) == {"abc-4567", "12345"}
    text = "override_dirname: +db.url=mysql://u:pw-98765@h/x,+service.api_token=tok-123456"
    assert "123456" not in redact(text, hidden) and "98765" not in redact(text, hidden)
