"""The C{identity} section: its shape, its defaults, and errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest

from kthena.config.identity import (
    DEFAULT_ALGORITHMS,
    DEFAULT_PRIORITIES,
    HeaderConfig,
    IdentityConfig,
    JwtConfig,
    parse_identity,
)
from kthena.config.validate import ConfigError, Where

WHERE = Where("router.yaml")


def parse(value: object) -> IdentityConfig:
    return parse_identity(value, WHERE.at("identity"))


def jwt(**extra: Any) -> dict[str, Any]:
    return {"issuer": "https://idp.example", "audiences": ["kthena"], "jwksFile": "/k", **extra}


def test_absent_section_is_anonymous_for_everyone() -> None:
    value: object
    for value in (None, {}):
        config = parse(value)
        assert config == IdentityConfig()
        assert config.jwt is None and config.header is None
        assert config.priorities == DEFAULT_PRIORITIES == ("critical", "standard", "sheddable")
        assert config.default_priority == "standard"


def test_the_full_section() -> None:
    config = parse(
        {
            "jwt": {
                "issuer": "https://idp.example",
                "audiences": ["kthena", "other"],
                "jwksUrl": "https://idp.example/.well-known/jwks.json",
                "refreshInterval": "5m",
                "algorithms": ["RS256", "PS256", "ES384", "EdDSA"],
                "required": False,
                "userClaim": "email",
                "priorityClaim": "priority",
                "leeway": "45s",
            },
            "header": {"user": "X-User-Id", "priority": "X-Priority"},
            "priorities": ["gold", "silver", "bronze"],
            "defaultPriority": "silver",
        }
    )
    assert config.jwt == JwtConfig(
        issuer="https://idp.example",
        audiences=("kthena", "other"),
        jwks_url="https://idp.example/.well-known/jwks.json",
        refresh_interval=300.0,
        algorithms=("RS256", "PS256", "ES384", "EdDSA"),
        required=False,
        user_claim="email",
        priority_claim="priority",
        leeway=45.0,
    )
    assert config.header == HeaderConfig(user="X-User-Id", priority="X-Priority")
    assert config.priorities == ("gold", "silver", "bronze")
    assert config.default_priority == "silver"


def test_jwt_defaults() -> None:
    config = parse({"jwt": jwt()}).jwt
    assert config is not None
    assert config.jwks_file == "/k" and config.jwks_url is None
    assert config.algorithms == DEFAULT_ALGORITHMS == ("RS256", "ES256", "EdDSA")
    assert config.required is True
    assert config.user_claim == "sub"
    assert config.priority_claim is None
    assert config.refresh_interval == 300.0
    assert config.leeway == 30.0
    assert parse({"header": {"user": "X-User"}}).header == HeaderConfig("X-User", None)


def test_the_source_is_logged_without_credentials() -> None:
    config = parse({"jwt": jwt(jwksFile=None, jwksUrl="https://u:hunter2@idp.example/jwks")}).jwt
    assert config is not None
    assert "hunter2" not in config.source
    assert config.source.startswith("https://u:") and config.source.endswith("@idp.example/jwks")


BAD: list[tuple[str, object, str]] = [
    ("not a mapping", [], "router.yaml: identity: must be a mapping, not a list"),
    ("unknown key", {"users": 1}, "router.yaml: identity.users: unknown field"),
    ("unknown jwt key", {"jwt": jwt(issuers=["x"])}, "identity.jwt.issuers: unknown field"),
    ("unknown header key", {"header": {"user": "X-U", "group": "X-G"}}, "identity.header.group"),
    (
        "no issuer",
        {"jwt": {"audiences": ["a"], "jwksFile": "/k"}},
        "identity.jwt.issuer: is required",
    ),
    ("empty issuer", {"jwt": jwt(issuer="")}, "identity.jwt.issuer: must not be empty"),
    (
        "no audiences",
        {"jwt": {"issuer": "i", "jwksFile": "/k"}},
        "identity.jwt.audiences: is required",
    ),
    (
        "empty audiences",
        {"jwt": jwt(audiences=[])},
        "identity.jwt.audiences: must hold at least one",
    ),
    (
        "audience not a list",
        {"jwt": jwt(audiences="kthena")},
        "identity.jwt.audiences: must be a list",
    ),
    (
        "audience not a string",
        {"jwt": jwt(audiences=["a", 3])},
        "identity.jwt.audiences[1]: must be a string",
    ),
    (
        "twice the audience",
        {"jwt": jwt(audiences=["a", "a"])},
        "identity.jwt.audiences[1]: 'a' is listed twice",
    ),
    (
        "no key source",
        {"jwt": jwt(jwksFile=None)},
        "identity.jwt: needs exactly one of jwksFile and jwksUrl",
    ),
    (
        "two key sources",
        {"jwt": jwt(jwksUrl="https://idp/jwks")},
        "identity.jwt: needs exactly one of",
    ),
    (
        "ftp url",
        {"jwt": jwt(jwksFile=None, jwksUrl="ftp://idp/jwks")},
        "identity.jwt.jwksUrl: must be an http:// or https:// URL",
    ),
    (
        "url without host",
        {"jwt": jwt(jwksFile=None, jwksUrl="https:///jwks")},
        "identity.jwt.jwksUrl: must be an http",
    ),
    (
        "url with fragment",
        {"jwt": jwt(jwksFile=None, jwksUrl="https://idp/jwks#x")},
        "identity.jwt.jwksUrl: must not have a #fragment",
    ),
    ("empty file", {"jwt": jwt(jwksFile="")}, "identity.jwt.jwksFile: must not be empty"),
    (
        "bad interval",
        {"jwt": jwt(refreshInterval="soon")},
        "identity.jwt.refreshInterval: is not a duration",
    ),
    (
        "short interval",
        {"jwt": jwt(refreshInterval="1s")},
        "identity.jwt.refreshInterval: must be at least 10s",
    ),
    ("negative leeway", {"jwt": jwt(leeway=-1)}, "identity.jwt.leeway: must not be negative"),
    ("huge leeway", {"jwt": jwt(leeway="1h")}, "identity.jwt.leeway: must be at most 300s"),
    (
        "alg none",
        {"jwt": jwt(algorithms=["RS256", "none"])},
        "identity.jwt.algorithms[1]: 'none' is not allowed: only public-key",
    ),
    (
        "alg hmac",
        {"jwt": jwt(algorithms=["HS256"])},
        "identity.jwt.algorithms[0]: 'HS256' is not allowed",
    ),
    (
        "alg unknown",
        {"jwt": jwt(algorithms=["RS999"])},
        "identity.jwt.algorithms[0]: must be one of RS256",
    ),
    (
        "no algorithms",
        {"jwt": jwt(algorithms=[])},
        "identity.jwt.algorithms: must hold at least one",
    ),
    (
        "required not bool",
        {"jwt": jwt(required="yes")},
        "identity.jwt.required: must be true or false",
    ),
    ("user claim empty", {"jwt": jwt(userClaim="")}, "identity.jwt.userClaim: must not be empty"),
    (
        "priority claim number",
        {"jwt": jwt(priorityClaim=1)},
        "identity.jwt.priorityClaim: must be a string",
    ),
    ("jwt not a mapping", {"jwt": "yes"}, "identity.jwt: must be a mapping, not a string"),
    ("header without user", {"header": {"priority": "X-P"}}, "identity.header.user: is required"),
    (
        "header bad name",
        {"header": {"user": "X User"}},
        "identity.header.user: is not an HTTP header name",
    ),
    (
        "header credential",
        {"header": {"user": "Authorization"}},
        "identity.header.user: 'Authorization' names a credential",
    ),
    (
        "header priority bad",
        {"header": {"user": "X-U", "priority": "X:P"}},
        "identity.header.priority: is not an HTTP header name",
    ),
    ("priorities empty", {"priorities": []}, "identity.priorities: must hold at least one"),
    ("priorities null", {"priorities": None}, "identity.priorities: must be a list"),
    (
        "priority bad name",
        {"priorities": ["a b"]},
        "identity.priorities[0]: 'a b' is not a priority class name",
    ),
    (
        "priority twice",
        {"priorities": ["Gold", "gold"]},
        "identity.priorities[1]: 'gold' is listed twice",
    ),
    (
        "sheddable not last",
        {"priorities": ["sheddable", "standard"]},
        "identity.priorities: 'sheddable' must be the last (lowest) class",
    ),
    (
        "default not listed",
        {"defaultPriority": "gold"},
        "identity.defaultPriority: must be one of the priorities (critical, standard, "
        "sheddable), not 'gold'",
    ),
    (
        "default gone",
        {"priorities": ["gold", "silver"]},
        "identity.defaultPriority: must be one of the priorities (gold, silver), not 'standard'",
    ),
]


@pytest.mark.parametrize(("case", "value", "message"), BAD, ids=[c[0] for c in BAD])
def test_errors_name_the_field(case: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(value)
    assert message in str(e.value)


def test_a_url_with_credentials_is_redacted_in_errors() -> None:
    with pytest.raises(ConfigError) as e:
        parse({"jwt": jwt(jwksFile=None, jwksUrl="ftp://u:hunter2@idp/jwks")})
    assert "hunter2" not in str(e.value)
    assert "identity.jwt.jwksUrl" in str(e.value)
