"""Fault settings: validated, all-or-nothing updates; seeded dice."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kthena.sim.faults import FaultDice, Faults

DEFAULTS: dict[str, Any] = {
    "error_rate": 0.0,
    "error_status": 500,
    "abort_rate": 0.0,
    "drop_after_tokens": None,
    "slowdown": 1.0,
    "metrics_down": False,
}
KNOWN = "abort_rate, drop_after_tokens, error_rate, error_status, metrics_down, slowdown"


def test_defaults() -> None:
    assert Faults().as_dict() == DEFAULTS


def test_partial_update_changes_only_the_named_fields() -> None:
    faults = Faults()
    faults.update({"error_rate": 0.25, "error_status": 503})
    assert faults.as_dict() == {**DEFAULTS, "error_rate": 0.25, "error_status": 503}
    faults.update({"slowdown": 3})
    assert faults.as_dict() == {
        **DEFAULTS,
        "error_rate": 0.25,
        "error_status": 503,
        "slowdown": 3.0,
    }
    faults.update({})
    assert faults.error_rate == 0.25


def test_rates_and_slowdown_are_stored_as_floats() -> None:
    faults = Faults()
    faults.update({"error_rate": 1, "abort_rate": 0, "slowdown": 2})
    assert type(faults.error_rate) is float
    assert type(faults.abort_rate) is float
    assert type(faults.slowdown) is float
    assert faults.error_rate == 1.0


@pytest.mark.parametrize(
    "changes",
    [
        {"error_rate": 0.0},
        {"error_rate": 1.0},
        {"abort_rate": 0.5},
        {"error_status": 400},
        {"error_status": 599},
        {"drop_after_tokens": 0},
        {"drop_after_tokens": 12},
        {"drop_after_tokens": None},
        {"slowdown": 0.001},
        {"slowdown": 100},
    ],
)
def test_accepted_values(changes: dict[str, Any]) -> None:
    faults = Faults()
    faults.update(changes)
    for key, value in changes.items():
        assert getattr(faults, key) == value


def test_drop_after_tokens_can_be_cleared() -> None:
    faults = Faults()
    faults.update({"drop_after_tokens": 5})
    assert faults.drop_after_tokens == 5
    faults.update({"drop_after_tokens": None})
    assert faults.drop_after_tokens is None


RATE = "{} must be a number from 0 to 1"
STATUS = "error_status must be an HTTP error status (400..599)"
DROP = "drop_after_tokens must be a whole number >= 0, or null"
SLOW = "slowdown must be a number > 0"


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"error_rate": 1.5}, RATE.format("error_rate")),
        ({"error_rate": -0.1}, RATE.format("error_rate")),
        ({"error_rate": "0.5"}, RATE.format("error_rate")),
        ({"error_rate": True}, RATE.format("error_rate")),
        ({"error_rate": None}, RATE.format("error_rate")),
        ({"error_rate": math.nan}, RATE.format("error_rate")),
        ({"abort_rate": 2}, RATE.format("abort_rate")),
        ({"abort_rate": [0.5]}, RATE.format("abort_rate")),
        ({"error_status": 399}, STATUS),
        ({"error_status": 600}, STATUS),
        ({"error_status": 200}, STATUS),
        ({"error_status": 500.0}, STATUS),
        ({"error_status": "500"}, STATUS),
        ({"error_status": True}, STATUS),
        ({"drop_after_tokens": -1}, DROP),
        ({"drop_after_tokens": 1.5}, DROP),
        ({"drop_after_tokens": "3"}, DROP),
        ({"drop_after_tokens": False}, DROP),
        ({"slowdown": 0}, SLOW),
        ({"slowdown": -1.0}, SLOW),
        ({"slowdown": "2"}, SLOW),
        ({"slowdown": True}, SLOW),
        ({"slowdown": None}, SLOW),
        ({"slowdown": math.nan}, SLOW),
        ({"slowdown": math.inf}, SLOW),
        ({"bogus": 1}, f"unknown field 'bogus'; known: {KNOWN}"),
    ],
)
def test_rejected_values(changes: dict[str, Any], error: str) -> None:
    faults = Faults()
    with pytest.raises(ValueError) as raised:
        faults.update(changes)
    assert str(raised.value) == error
    assert faults.as_dict() == DEFAULTS


@pytest.mark.parametrize("body", [None, [], [("error_rate", 0.5)], "error_rate=0.5", 1])
def test_body_must_be_an_object(body: object) -> None:
    faults = Faults()
    with pytest.raises(ValueError) as raised:
        faults.update(body)
    assert str(raised.value) == "the body must be a JSON object"
    assert faults.as_dict() == DEFAULTS


def test_update_is_all_or_nothing() -> None:
    faults = Faults()
    faults.update({"error_rate": 0.1})
    before = faults.as_dict()
    # Good fields before a bad one are not applied either.
    with pytest.raises(ValueError, match="slowdown"):
        faults.update({"error_rate": 0.9, "abort_rate": 0.2, "slowdown": 0})
    assert faults.as_dict() == before
    with pytest.raises(ValueError, match="unknown field 'nope'"):
        faults.update({"error_status": 502, "nope": True})
    assert faults.as_dict() == before


def test_first_bad_field_is_named() -> None:
    faults = Faults()
    with pytest.raises(ValueError) as raised:
        faults.update({"error_status": 42, "slowdown": -1})
    assert str(raised.value) == STATUS


def test_reset_restores_defaults() -> None:
    faults = Faults()
    faults.update(
        {
            "error_rate": 0.5,
            "error_status": 429,
            "abort_rate": 0.5,
            "drop_after_tokens": 3,
            "slowdown": 5,
        }
    )
    assert faults.as_dict() != DEFAULTS
    faults.reset()
    assert faults.as_dict() == DEFAULTS


def test_as_dict_is_a_copy() -> None:
    faults = Faults()
    snapshot = faults.as_dict()
    snapshot["error_rate"] = 0.9
    assert faults.error_rate == 0.0


# -- dice


def test_rate_zero_never_hits() -> None:
    dice = FaultDice(Faults(), seed=1)
    assert not any(dice.error() for _ in range(2_000))
    assert not any(dice.abort() for _ in range(2_000))


def test_rate_one_always_hits() -> None:
    faults = Faults()
    faults.update({"error_rate": 1, "abort_rate": 1})
    dice = FaultDice(faults, seed=1)
    assert all(dice.error() for _ in range(2_000))
    assert all(dice.abort() for _ in range(2_000))


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.75])
def test_share_of_hits_follows_the_rate(rate: float) -> None:
    faults = Faults()
    faults.update({"error_rate": rate, "abort_rate": 1 - rate})
    dice = FaultDice(faults, seed=12345)
    draws = 20_000
    errors = sum(dice.error() for _ in range(draws))
    aborts = sum(dice.abort() for _ in range(draws))
    # Binomial standard deviation is at most 0.0036 of the draws: allow about 5 of them.
    assert abs(errors / draws - rate) < 0.02
    assert abs(aborts / draws - (1 - rate)) < 0.02


def test_error_and_abort_use_their_own_rates() -> None:
    faults = Faults()
    faults.update({"error_rate": 1, "abort_rate": 0})
    dice = FaultDice(faults, seed=3)
    assert all(dice.error() for _ in range(100))
    assert not any(dice.abort() for _ in range(100))


def test_same_seed_same_draws() -> None:
    faults = Faults()
    faults.update({"error_rate": 0.5})
    first = FaultDice(faults, seed=7)
    second = FaultDice(faults, seed=7)
    draws = [first.error() for _ in range(200)]
    assert draws == [second.error() for _ in range(200)]
    assert any(draws)
    assert not all(draws)
    other = FaultDice(faults, seed=8)
    assert draws != [other.error() for _ in range(200)]


def test_dice_follow_updates_of_their_faults() -> None:
    faults = Faults()
    dice = FaultDice(faults, seed=0)
    assert not dice.error()
    faults.update({"error_rate": 1})
    assert dice.error()
    faults.reset()
    assert not dice.error()
