"""What a sync route's caller learns of a failed execution (InboxResult)."""

from __future__ import annotations

import pytest

from picloud_shared.execution import ExecError, ExecResult
from picloud_shared.ids import new_execution_id
from picloud_shared.inbox import CALLER_MESSAGES, InboxResult
from picloud_shared.status import ExecErrorKind, InboxFailureKind

SECRET = "ValueError: card 4111-1111-1111-1111 declined"


@pytest.mark.parametrize("kind", sorted(CALLER_MESSAGES))
def test_a_script_error_tells_the_caller_how_it_failed_not_its_text(kind: ExecErrorKind) -> None:
    """The caller of a failed script gets the way it failed; the exception's text (which
    may quote the app's data) stays in the execution record."""
    result = ExecResult.failed(new_execution_id(), ExecError(kind, SECRET), ())
    answer = InboxResult.from_exec_result(result)
    assert answer.failure is InboxFailureKind.SCRIPT_ERROR
    assert "4111" not in answer.message
    assert answer.message.startswith(CALLER_MESSAGES[kind])


def test_every_script_error_kind_has_a_caller_message() -> None:
    """No kind of the script_error class falls back to the script's own text."""
    script_errors = {
        k
        for k in ExecErrorKind
        if InboxResult.from_exec_result(
            ExecResult.failed(new_execution_id(), ExecError(k, "x"), ())
        ).failure
        is InboxFailureKind.SCRIPT_ERROR
    }
    assert script_errors == set(CALLER_MESSAGES)


def test_a_rejection_reaches_the_caller_as_the_script_wrote_it() -> None:
    """ctx.reject's message is the script's answer to its caller."""
    result = ExecResult.failed(
        new_execution_id(), ExecError(ExecErrorKind.REJECTED, "quantity must be positive"), ()
    )
    answer = InboxResult.from_exec_result(result)
    assert (answer.failure, answer.message) == (
        InboxFailureKind.REJECTED,
        "quantity must be positive",
    )
