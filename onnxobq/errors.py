"""The one exception type that the CLI turns into a one-line error with exit status 2."""


class UserError(Exception):
    """A problem with what the user gave us: a file, an option or the calibration data.

    The message names the input and says how to fix it. The CLI prints it on one
    line and exits with status 2; it never shows a traceback.
    """


def cannot_read(flag: str, path, exc: OSError) -> UserError:
    """The error for a file given with ``flag`` that the operating system would not let us read."""
    return UserError(f"{flag} {path}: cannot read it ({exc.strerror or type(exc).__name__}); "
                     "make it readable or give another file")
