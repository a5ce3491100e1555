"""
Reading untrusted YAML into typed values, with errors that say where.

Every reader takes the raw value and a L{Where} (file, document, field path) and either
returns a checked value or raises L{ConfigError} naming the file, the document and the
field, so that an operator can fix a config without guessing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from twisted.internet.endpoints import serverFromString

from kthena.redact import is_secret_name, redact_quoted, redact_text

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class ConfigError(Exception):
    """
    A configuration that cannot be used; C{str()} is the message for the operator, with
    any secret it quotes redacted (it goes to logs and to the terminal).
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact_text(message))


@dataclass(frozen=True, slots=True)
class Where:
    """
    A place in the configuration: a file, a document in it (C{"document 2"} of a YAML
    stream, or C{"resources[0]"} inline in the router file), what that document is, and
    a field path inside it.
    """

    source: str
    document: str | None = None
    label: str = ""
    field: str = ""

    def at(self, key: str | int) -> Where:
        if isinstance(key, int):
            return replace(self, field=f"{self.field}[{key}]")
        return replace(self, field=f"{self.field}.{key}" if self.field else key)

    def named(self, label: str) -> Where:
        return replace(self, label=label)

    def describe(self) -> str:
        parts = [self.source]
        if self.document is not None:
            parts.append(self.document + (f" ({self.label})" if self.label else ""))
        if self.field:
            parts.append(self.field)
        return ": ".join(parts)

    @property
    def secret(self) -> bool:
        """The field names a credential (an C{authorization} header match, a password)."""
        return any(is_secret_name(part) for part in re.split(r"[.\[\]]", self.field) if part)

    def fail(self, message: str) -> NoReturn:
        raise ConfigError(
            f"{self.describe()}: {redact_quoted(message) if self.secret else message}"
        )


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def mapping(
    value: object,
    where: Where,
    known: Collection[str] | None = None,
    required: Collection[str] = (),
) -> dict[str, Any]:
    """A mapping with string keys, only C{known} ones (when given), C{required} present."""
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        where.fail(f"must be a mapping, not {_type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            where.fail(f"keys must be strings, not {_type_name(key)}")
        if known is not None and key not in known:
            where.at(key).fail(f"unknown field; known fields: {', '.join(sorted(known))}")
    for key in required:
        if key not in value:
            where.at(key).fail("is required")
    return dict(value)


def sequence(value: object, where: Where, *, max_items: int | None = None) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        where.fail(f"must be a list, not {_type_name(value)}")
    if max_items is not None and len(value) > max_items:
        where.fail(f"has {len(value)} items; at most {max_items} are allowed")
    return value


def string(value: object, where: Where, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        where.fail(f"must be a string, not {_type_name(value)}")
    if not empty and not value:
        where.fail("must not be empty")
    return value


def optional_string(value: object, where: Where) -> str | None:
    return None if value is None else string(value, where)


def choice(value: object, where: Where, options: Collection[str]) -> str:
    text = string(value, where)
    if text not in options:
        where.fail(f"must be one of {', '.join(options)}, not {text!r}")
    return text


def integer(
    value: object, where: Where, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        where.fail(f"must be a whole number, not {_type_name(value)}")
    if minimum is not None and value < minimum:
        where.fail(f"must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        where.fail(f"must be at most {maximum}, not {value}")
    return value


def number(value: object, where: Where, *, minimum: float | None = None) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        where.fail(f"must be a number, not {_type_name(value)}")
    if minimum is not None and value < minimum:
        where.fail(f"must be at least {minimum}, not {value}")
    return float(value)


def boolean(value: object, where: Where) -> bool:
    if not isinstance(value, bool):
        where.fail(f"must be true or false, not {_type_name(value)}")
    return value


def labels(value: object, where: Where) -> dict[str, str]:
    """A label map: string keys to string values (YAML numbers are refused, as Kubernetes does)."""
    result = mapping(value, where)
    for key, item in result.items():
        string(item, where.at(key), empty=True)
    return result


_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.match(prefix)):
        return "its prefix must be a lower-case DNS subdomain of at most 253 characters"
    if not (len(name) <= 63 and _LABEL_NAME.match(name)):
        return (
            "its name must be 1-63 characters: letters, digits, '-', '_' or '.', starting "
            "and ending with a letter or digit"
        )
    return None


def selector(value: object, where: Where) -> dict[str, str]:
    """
    A label selector's C{matchLabels}, as Kubernetes (and Kthena's webhook) accepts it: at
    least one label (an empty selector would select every pod in the namespace), keys that
    are qualified names (C{app}, C{example.com/tier}), values of at most 63 characters.
    """
    result = labels(value, where)
    if not result:
        where.fail("must hold at least one label (an empty selector selects every pod)")
    for key, item in result.items():
        problem = _label_key_problem(key)
        if problem is not None:
            where.at(key).fail(f"{key!r} is not a valid label key: {problem}")
        if item and not (len(item) <= 63 and _LABEL_NAME.match(item)):
            where.at(key).fail(
                f"{item!r} is not a valid label value: at most 63 characters, letters, digits, "
                "'-', '_' or '.', starting and ending with a letter or digit"
            )
    return result


def duration(value: object, where: Where) -> float:
    """
    Seconds, from a Go / Kubernetes duration (C{"30s"}, C{"1m30s"}, C{"100ms"}) or a
    plain number of seconds.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            where.fail(f"must not be negative, not {value}")
        return float(value)
    text = string(value, where)
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        where.fail(f"is not a duration like 30s, 1m30s or 100ms: {text!r}")
    return total


def positive_duration(value: object, where: Where) -> float:
    """A L{duration} of more than zero seconds."""
    seconds = duration(value, where)
    if seconds <= 0:
        where.fail("must be more than 0s")
    return seconds


def regex(value: object, where: Where) -> re.Pattern[str]:
    text = string(value, where, empty=True)
    try:
        return re.compile(text)
    except re.error as e:
        where.fail(f"is not a valid regular expression ({e}): {text!r}")


def endpoint(value: object, where: Where) -> str:
    """
    A Twisted server endpoint string (C{tcp:8080}, C{tcp:8080:interface=127.0.0.1},
    C{unix:/run/kthena.sock}, C{systemd:domain=INET:index=0}), checked by parsing it, so
    that a typo is a config error rather than a failure to listen.
    """
    text = string(value, where)
    if text.startswith("systemd:"):
        return text  # names a socket systemd passes in: only checkable under systemd
    try:
        parsed = serverFromString(None, text)  # parsing only: no reactor is touched
    except Exception as e:
        where.fail(f"is not a valid endpoint like tcp:8080 ({e}): {text!r}")
    port = getattr(parsed, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        where.fail(f"port {port} is not a TCP port (0-65535): {text!r}")
    interface = getattr(parsed, "_interface", "")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            where.fail(f"interface must be an IP address, not {interface!r}: {text!r}")
    return text
