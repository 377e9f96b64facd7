"""The base of every failure Flywheel explains to users itself (bad config, source or data)."""


class FlywheelError(Exception):
    """An expected failure whose message says what is wrong and where; no traceback needed."""
