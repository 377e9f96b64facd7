import pytest

from flywheel.tasks.retries import retry_on_io


class FailedState:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (OSError("disk"), True),
        (TimeoutError("slow"), True),  # an OSError subclass
        (ConnectionError("reset"), True),
        (ValueError("bad row"), False),
        (KeyError("column"), False),
    ],
)
def test_only_io_errors_are_retried(exc, retry):
    assert retry_on_io(None, None, FailedState(exc)) is retry
