"""
Reading the files a config names: YAML streams (errors by line and column, never quoting
the lines: they may hold credentials), and cheap stamps to notice when any of them, or
the matches of a glob, change.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import yaml

from kthena.config.validate import ConfigError


def yaml_documents(path: str) -> Iterator[tuple[int, object]]:
    """The non-empty documents of a YAML file, numbered from 1."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    try:
        for number_, doc in enumerate(yaml.safe_load_all(text), start=1):
            if doc is not None:
                yield number_, doc
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from e


def _yaml_problem(error: yaml.YAMLError) -> str:
    """
    What the YAML parser found and where, by line and column. Not its own message: that
    quotes the offending lines as written, and a line may hold a credential (an
    C{authorization} header match, a Redis password) cut anywhere.
    """
    if not isinstance(error, yaml.MarkedYAMLError):
        return error.__class__.__name__
    parts = []
    if error.problem_mark is not None:
        mark = error.problem_mark
        parts.append(f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}")
    else:
        parts.append(str(error.problem))
    if error.context is not None:
        context = error.context
        if error.context_mark is not None:
            mark = error.context_mark
            context += f" at line {mark.line + 1}, column {mark.column + 1}"
        parts.append(f"({context})")
    return " ".join(parts)


def file_stamps(paths: tuple[str, ...]) -> tuple[tuple[str, object, int], ...]:
    """
    Modification time and size of each file, and the matches of each glob, to notice
    changes cheaply.
    """
    stamps: list[tuple[str, object, int]] = []
    for path in paths:
        if glob.has_magic(path):
            stamps.append((path, tuple(sorted(glob.glob(path))), 0))
            continue
        try:
            st = os.stat(path)
            stamps.append((path, st.st_mtime, st.st_size))
        except OSError:
            stamps.append((path, -1.0, -1))
    return tuple(stamps)
