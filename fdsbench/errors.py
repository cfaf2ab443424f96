"""User-facing errors: one line that says what is wrong and how to fix it.

The CLI prints ``FdsError`` as ``error: <message>`` and exits with status 2, never with a traceback
from deep inside. Raise it wherever bad input (a path, a name, a file) is detected."""


class FdsError(Exception):
    """An error caused by the user's input or environment, with the fix in its message."""


class UnknownNameError(FdsError, KeyError):
    """A method, dataset, protocol or class name that is not registered."""

    def __init__(self, kind: str, name: str, known):
        known = sorted(known)
        super().__init__(f"unknown {kind} '{name}'; known: {', '.join(known) if known else '(none)'}")
        self.kind, self.name, self.known = kind, name, known

    def __str__(self):  # KeyError would repr() the message
        return self.args[0]


class DataError(FdsError):
    """A dataset file or tree that cannot be used as it is (names the file)."""


class WeightsError(FdsError):
    """A missing or mismatching weights file (names the file, sha256 and where it is published)."""


class WriteError(FdsError, OSError):
    """A file that cannot be written (full disk, read-only or unwritable folder): names the file and
    the fix. Also an ``OSError``, so callers that tolerate a failed optional write (a cache) still do.
    Built as ``WriteError(errno, message)``."""

    def __str__(self):
        return self.strerror or super().__str__()
