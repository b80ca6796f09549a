"""The PicloudError tree: stable codes, statuses, docstring messages."""

from __future__ import annotations

import re

from picloud_shared import errors


def test_codes_are_unique_snake_case() -> None:
    """Every error class has its own snake_case code."""
    codes = [cls.code for cls in errors.ALL_ERRORS]
    assert len(codes) == len(set(codes))
    assert all(re.fullmatch(r"[a-z_]+", c) for c in codes)


def test_statuses_are_http_errors() -> None:
    """Every error maps to a 4xx or 5xx status."""
    assert all(400 <= cls.http_status <= 599 for cls in errors.ALL_ERRORS)


def test_docstring_is_the_default_message() -> None:
    """An error raised without a message says its docstring."""
    e = errors.UnknownScript()
    assert e.to_wire() == {
        "code": "unknown_script",
        "message": "No script of that name exists in this app.",
    }
    assert errors.NotFound("no such app").to_wire()["message"] == "no such app"


def test_validation_errors_are_422() -> None:
    """Every InvalidInput is a 422."""
    assert all(
        cls.http_status == 422 for cls in errors.ALL_ERRORS if issubclass(cls, errors.InvalidInput)
    )
