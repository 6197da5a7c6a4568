"""One stack for the whole fault suite (starting the model twice per module
would cost more than the faults themselves). Each test starts from a
healthy stack: whatever an earlier test left dead is started again first."""

from __future__ import annotations

import pytest

from harness.stack import Stack
from tests.support import started


@pytest.fixture(scope="package")
def stack(tmp_path_factory):
    yield from started(Stack(tmp_path_factory.mktemp("faults")))


@pytest.fixture
def healthy(stack):
    stack.ensure_healthy()
    return stack
