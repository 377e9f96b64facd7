import logging
import sys

from flywheel.config import ConfigError
from flywheel.runtime import NoTracebackForExpectedErrors


def record_for(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed", (), info)


def test_expected_errors_lose_their_traceback_others_keep_it():
    expected = record_for(ConfigError("split: must sum to 1"))
    assert NoTracebackForExpectedErrors().filter(expected)
    assert expected.exc_info is None
    unexpected = record_for(ZeroDivisionError("bug"))
    assert NoTracebackForExpectedErrors().filter(unexpected)
    assert unexpected.exc_info is not None
