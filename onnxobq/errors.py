"""The one exception type for bad input, and how its messages name the options.

A message names the option at fault with :func:`option`, in the spelling of whoever called:
a Python parameter (``act_bits=8``) for the library, a flag (``--act-bits 8``) where the
command line has set its table with :func:`spelled_as`. The same holds for the notes of the
report, so that each reader sees the names they typed.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

# Python parameters that take a dict; a value "key=..." names one entry.
_KEYED = ("input_shapes", "layer_bits", "layer_group_size")
# The flag of each Python parameter while the command line runs (None: Python's own names).
_FLAGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("onnxobq_flags", default=None)


class UserError(Exception):
    """A problem with what the user gave us: a file, an option or the calibration data.

    The message names the input and says how to fix it. The command line prints it on one
    line and exits with status 2; it never shows a traceback.
    """


def option(name: str, value=None) -> str:
    """An option as the caller spells it: ``name`` or ``name=value`` in Python, the flag (and
    its value) on the command line. A boolean's other flag (``symmetric=False`` is
    ``--asymmetric``) is looked up whole first."""
    flags = _FLAGS.get()
    if flags is None and name in _KEYED and isinstance(value, str) and "=" in value:
        key, _, rest = value.partition("=")       # an entry of a dict: input_shapes['x']=1x3x?x?
        return f"{name}[{key!r}]={rest}"
    if flags is None:
        return name if value is None else f"{name}={value}"
    if value is not None and f"{name}={value}" in flags:
        return flags[f"{name}={value}"]
    flag = flags.get(name, name)
    return flag if value is None else f"{flag} {value}"


@contextlib.contextmanager
def spelled_as(flags: dict[str, str]):
    """Spell options with ``flags`` (Python name -> flag) within the block (and in the threads
    that the run starts from it: see :func:`in_context`)."""
    token = _FLAGS.set(flags)
    try:
        yield
    finally:
        _FLAGS.reset(token)


def in_context(fn):
    """``fn`` bound to the caller's context, to run on other threads with the same spelling (each
    call runs in its own copy: a context can be entered by one thread at a time)."""
    context = contextvars.copy_context()
    return lambda *args, **kwargs: context.copy().run(fn, *args, **kwargs)


def check_utf8_path(what: str, path) -> None:
    """Refuse a path whose bytes are not UTF-8 (Python holds them as surrogates): onnx's checker
    cannot open it, and it cannot be printed. ``what``: the option that gave it."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise UserError(f"{option(what)} {shown}: the path is not valid UTF-8, which onnx cannot open; "
                        "rename it with UTF-8 characters only") from None
    except TypeError:
        pass


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
