"""The one exception type for mistakes a user can fix."""


class SetrainError(Exception):
    """A user error: the message says what is wrong and how to fix it.

    The command-line entry points print it as one line without a traceback.
    """
