"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class DoolyError(Exception):
    """A user-facing problem: bad input, missing data, an unsupported request."""
