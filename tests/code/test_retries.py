import pytest

from flywheel.retries import retry_on_io


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


def test_io_tasks_retry_and_no_other_task_of_the_flow_does():
    """Every task the pipeline calls: only collect and version (sources, DVC push) retry, and
    only on I/O errors; a stage failing on bad data, a bad model or a gate must not re-run."""
    from prefect import Task

    from flywheel.flows import data, pipeline

    flow_modules = (vars(pipeline), vars(data))  # the model half and the data half
    tasks = {o.name: o for m in flow_modules for o in m.values() if isinstance(o, Task)}
    assert {"collect", "validate", "prepare", "train", "export", "promote", "report"} <= set(tasks)
    retrying = {name for name, t in tasks.items() if t.retries}
    assert retrying == {"collect", "version"}
    for name in retrying:
        assert tasks[name].retry_condition_fn is retry_on_io
