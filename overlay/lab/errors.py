"""The lab's one kind of error."""


class TestbedError(Exception):
    """A one-line, actionable reason the testbed could not do what was asked."""

    __test__ = False  # not a pytest test class despite the name
