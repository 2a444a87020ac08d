"""The transport-neutral helpers every error table uses: the nearest known class, and the message."""

from __future__ import annotations

from service.errors import BadRequest, Conflict, InvalidInput, LimitExceeded, describe, nearest

TABLE = {InvalidInput: "invalid", Conflict: "conflict"}


def test_nearest_takes_the_closest_class_in_the_mro() -> None:
    assert nearest(TABLE, Conflict("taken")) == "conflict"
    assert nearest(TABLE, LimitExceeded("full")) == "conflict"  # Conflict is nearer than InvalidInput
    assert nearest(TABLE, BadRequest("bad")) == "invalid"
    assert nearest(TABLE, ValueError("other")) is None


def test_describe_falls_back_to_the_class_name() -> None:
    assert describe(Conflict("region 'a' is registered")) == "region 'a' is registered"
    assert describe(LimitExceeded()) == "LimitExceeded"
