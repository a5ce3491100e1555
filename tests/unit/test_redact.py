"""
Redaction: secrets never reach a debug answer, a log line or an error message, the YAML
snippet of an invalid config included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kthena.config.router import load_config
from kthena.config.validate import ConfigError
from kthena.redact import REDACTED, is_secret_name, redact, redact_text, redact_url


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://admin:hunter2@redis:6379/0", f"redis://admin:{REDACTED}@redis:6379/0"),
        ("redis://:hunter2@redis:6379", f"redis://:{REDACTED}@redis:6379"),
        ("redis://hunter2@redis:6379", f"redis://{REDACTED}@redis:6379"),
        ("rediss://u:p%40ss@redis.example:6380", f"rediss://u:{REDACTED}@redis.example:6380"),
        ("admin:hunter2@redis:6379", f"admin:{REDACTED}@redis:6379"),
        ("redis://redis:6379?password=hunter2&db=1", "redis://redis:6379?password=<redacted>&db=1"),
        ("redis:6379", "redis:6379"),
        ("https://example.com/v1", "https://example.com/v1"),
        ("alice@example.com", "alice@example.com"),
    ],
)
def test_redact_url(text: str, shown: str) -> None:
    assert redact_url(text) == shown


def test_redact_walks_mappings_by_key_name() -> None:
    raw: dict[str, Any] = {
        "inputTokensPerUnit": 10,
        "apiKey": "k",
        "auth": {"token": "t", "user": "u"},
        "client_secret": ["a", "b"],
        "headers": {"X-Api-Key": {"exact": "k2"}, "X-Tier": {"prefix": "g"}},
        "password": None,
    }
    assert redact(raw) == {
        "inputTokensPerUnit": 10,
        "apiKey": REDACTED,
        "auth": {"token": REDACTED, "user": REDACTED},
        "client_secret": [REDACTED, REDACTED],
        "headers": {"X-Api-Key": {"exact": REDACTED}, "X-Tier": {"prefix": "g"}},
        "password": None,
    }
    assert not is_secret_name("outputTokensPerUnit")
    assert is_secret_name("Proxy-Authorization")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "connect redis://admin:S3cret@redis:6379 failed",
            f"connect redis://admin:{REDACTED}@redis:6379 failed",
        ),
        ("address 'redis://S3cret@redis:6379'", f"address 'redis://{REDACTED}@redis:6379'"),
        ('exact: "Bearer sk-abcdef123456"', f'exact: "Bearer {REDACTED}"'),
        ("Authorization: Basic dXNlcjpwdw==", f"Authorization: Basic {REDACTED}"),
        ("key sk-proj-abcdef0123", f"key sk-{REDACTED}"),
        (
            "https://example.com/v1 and alice@example.com",
            "https://example.com/v1 and alice@example.com",
        ),
        ("the bearer of bad news", "the bearer of bad news"),
    ],
)
def test_redact_text(text: str, shown: str) -> None:
    assert redact_text(text) == shown


SECRET_ROUTE = """\
listen: tcp:0
resources:
  - apiVersion: networking.serving.volcano.sh/v1alpha1
    kind: ModelRoute
    metadata: {name: m}
    spec:
      modelName: m
      rateLimit: {inputTokensPerUnit: 10, global: {redis: {address: "redis://admin:S3cretPass@redis:6379"}}}
      rules:
        - modelMatch: {headers: {authorization: {exact: "Bearer sk-abcdef123456"}}}
          targetModels: [{modelServerName: s}]
"""

SECRETS = ("S3cretPass", "sk-abcdef123456", "hunter2-token-value")


@pytest.mark.parametrize(
    "broken",
    [
        # The YAML parser quotes the line it stopped at.
        SECRET_ROUTE.replace("targetModels: [{modelServerName: s}]", "targetModels: [{"),
        SECRET_ROUTE.replace('sk-abcdef123456"}}}', "sk-abcdef123456}}}"),
        SECRET_ROUTE.replace('"Bearer sk-abcdef123456"}}}', '"hunter2-token-value"}}} x: y'),
        SECRET_ROUTE.replace('6379"}}}', '6379"}}} x: y'),
        SECRET_ROUTE.replace("    spec:\n      modelName: m", "    spec:\n\t  modelName: m"),
        # Validation errors that quote a value of a secret field.
        SECRET_ROUTE.replace(
            '{exact: "Bearer sk-abcdef123456"}', '{regex: "hunter2-token-value("}'
        ),
        SECRET_ROUTE.replace(
            'authorization: {exact: "Bearer sk-abcdef123456"}',
            'authorization: {exact: "hunter2-token-value", prefix: "hunter2-token-value"}',
        ),
        # Unknown model server: the error is elsewhere, the line is not quoted.
        SECRET_ROUTE,
    ],
    ids=[
        "unclosed-flow",
        "unclosed-quote-on-secret-line",
        "junk-after-header-secret",
        "junk-after-redis-url",
        "tab-indent",
        "bad-regex-of-secret-header",
        "two-matches-for-secret-header",
        "unknown-server",
    ],
)
def test_config_errors_never_quote_secrets(tmp_path: Path, broken: str) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(broken)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    message = str(caught.value)
    assert str(path) in message
    for secret in SECRETS:
        assert secret not in message, message
