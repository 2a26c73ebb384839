"""The one exception type that the CLI turns into a one-line error with exit status 2."""


class UserError(Exception):
    """A problem with what the user gave us: a file, an option or the calibration data.

    The message names the input and says how to fix it. The CLI prints it on one
    line and exits with status 2; it never shows a traceback.
    """


def cannot_read(what: str, exc: OSError) -> UserError:
    """The error for a file (``what``: its path, after the option that gave it) that the
    operating system would not let us read."""
    return UserError(f"{what}: cannot read it ({_reason(exc)}); make it readable or give another file")


def cannot_write(path: str, exc: OSError) -> UserError:
    """A failed write, named after the user's path rather than the temporary file or folder."""
    return UserError(f"{path}: cannot write it ({_reason(exc)}); "
                     "check the folder's permissions and the free disk space")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
