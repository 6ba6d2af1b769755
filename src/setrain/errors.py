"""The one exception type for mistakes a user can fix."""

WORKER_PREFIX = "Caught SetrainError in DataLoader worker"


class SetrainError(Exception):
    """A user error: the message says what is wrong and how to fix it.

    The command-line entry points print it as one line without a traceback. An error raised in a
    DataLoader worker (an image that does not decode) reaches the main process re-created from
    the worker's formatted traceback (torch's ExceptionWrapper); only its last line, the
    sentence, is kept.
    """

    def __init__(self, message: str):
        if message.startswith(WORKER_PREFIX):
            message = message.rstrip().rsplit("SetrainError: ", 1)[-1]
        super().__init__(message)
