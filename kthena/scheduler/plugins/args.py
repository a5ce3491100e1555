"""Checking plugin C{args}: unknown keys and bad values are configuration errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_args(plugin: str, args: Mapping[str, Any], known: dict[str, type]) -> dict[str, Any]:
    """
    @raise ValueError: naming the plugin and the argument.
    """
    for key, value in args.items():
        if key not in known:
            raise ValueError(
                f"{plugin}: unknown argument {key!r}; known: {', '.join(sorted(known)) or 'none'}"
            )
        wanted = known[key]
        if wanted is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, wanted) or isinstance(value, bool) != (wanted is bool):
            raise ValueError(f"{plugin}: {key} must be a {wanted.__name__}, not {value!r}")
    return dict(args)
