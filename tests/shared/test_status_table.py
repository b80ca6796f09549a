"""The failure table of DESIGN.md is total and exactly as documented."""

from __future__ import annotations

from picloud_shared.status import (
    ExecErrorKind,
    InboxFailureKind,
    failure_kind_for,
    http_status_for,
)


def test_every_exec_error_kind_maps_to_one_failure_kind() -> None:
    """No ExecErrorKind is left out of the table."""
    for kind in ExecErrorKind:
        assert isinstance(failure_kind_for(kind), InboxFailureKind)


def test_every_failure_kind_maps_to_its_documented_status() -> None:
    """422/502/503/504/507/500 as in DESIGN.md."""
    assert {k.value: http_status_for(k) for k in InboxFailureKind} == {
        "rejected": 422,
        "script_error": 502,
        "overloaded": 503,
        "timeout": 504,
        "resource_exhausted": 507,
        "internal": 500,
    }


def test_every_failure_kind_is_reachable() -> None:
    """Each failure class is produced by at least one execution error."""
    assert {failure_kind_for(k) for k in ExecErrorKind} == set(InboxFailureKind)


def test_script_faults_are_502_and_limits_507() -> None:
    """Spot-check the rows a user meets most."""
    assert http_status_for(failure_kind_for(ExecErrorKind.SYNTAX_ERROR)) == 502
    assert http_status_for(failure_kind_for(ExecErrorKind.UNCAUGHT_EXCEPTION)) == 502
    assert http_status_for(failure_kind_for(ExecErrorKind.MEMORY_LIMIT)) == 507
    assert http_status_for(failure_kind_for(ExecErrorKind.CPU_LIMIT)) == 504
    assert http_status_for(failure_kind_for(ExecErrorKind.REJECTED)) == 422
