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


def test_database_locked_is_retried():
    import sqlite3

    assert retry_on_io(None, None, FailedState(sqlite3.OperationalError("database is locked")))


def test_io_tasks_retry_and_data_tasks_do_not():
    from flywheel.tasks.clean import prepare_task
    from flywheel.tasks.collect import collect_task
    from flywheel.tasks.validate import validate_task
    from flywheel.tasks.version import version_task

    for io_task in (collect_task, version_task):
        assert io_task.retries == 2
        assert io_task.retry_condition_fn is retry_on_io
    for data_task in (validate_task, prepare_task):
        assert data_task.retries == 0
