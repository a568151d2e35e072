"""`sharpen resume` and `sharpen export` given a run directory that is not there: exit 2, one message."""

from __future__ import annotations

import pytest
from support.e2e import sharpen


@pytest.mark.parametrize(
    "args,message",
    [
        (["resume", "/nonexistent/run"], "no such run directory"),
        (["export", "/nonexistent/run", "--to", "/tmp/x"], "/nonexistent/run"),
    ],
)
def test_resume_bad_input(args, message):
    result = sharpen(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
