"""The files a run writes: the rules they follow, their default names, and atomic writes.

A run never writes over its input model, its external data or another input, never writes
two outputs to one path, and never replaces an existing file unless told to (``overwrite``).
Every file is written through a temporary one beside it and renamed into place.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import tempfile
import threading

from .errors import UserError, cannot_write, check_utf8_path, option


def default_output(model: str, bits: int, method: str, fmt: str, group_size: int | None = None,
                   act_bits: int | None = None, random: bool = False) -> str:
    """MODEL.w<bits>[g<N>][a<bits>].<method>[.random].<format>.onnx beside the model: the name says
    what made it, so that runs with other settings do not write the same file."""
    stem = os.path.splitext(model)[0]
    grid = f"w{bits}" + (f"g{group_size}" if group_size else "") + (f"a{act_bits}" if act_bits else "")
    return f"{stem}.{grid}.{method}{'.random' if random else ''}.{fmt}.onnx"


def check_outputs(written: dict, inputs: dict, model_files: list[str], overwrite: bool) -> None:
    """Refuse output paths that a run cannot write safely.

    Args:
        written: Python option name -> path, for each file the run writes (None: not written),
            the model ("output") first; it also writes ``<output>.data`` where it is large.
        inputs: option name -> path of each input file the run reads (None where absent).
        model_files: the input model's file and its external data files (none for a model
            given in memory).
        overwrite: an existing file may be replaced.

    Raises:
        UserError: an output is an input, two outputs share a path, an output is a folder or a
            device, its folder is missing, or it exists and ``overwrite`` is off.
    """
    taken: dict[str, str] = {}       # real path -> the option that writes it ("output.data": the model's data)
    for name, path in written.items():
        if path is None:
            continue
        check_utf8_path(name, path)
        shown, real = option(name, path), os.path.realpath(path)
        example = ("a file name ending in .onnx" if name == "output"
                   else "a file name, e.g. " + ("hessians.npz" if name == "save_hessians" else "report.json"))
        if name == "output":
            _output_is_no_input(shown, real, model_files)
        elif model_files and real == os.path.realpath(model_files[0]):
            raise UserError(f"{shown}: this is the input model; give another file, e.g. {example.split()[-1]}")
        elif taken.get(real) in ("output", "output.data"):
            what = "the output model" if taken[real] == "output" else "the output model's data"
            raise UserError(f"{shown}: this is {what}; give another file, e.g. {example.split()[-1]}")
        elif real in taken:
            raise UserError(f"{shown}: {option(taken[real])} writes there too; give two different files")
        for other, source in inputs.items():
            if source is not None and os.path.isfile(source) and real == os.path.realpath(source):
                raise UserError(f"{shown}: this is the {option(other)} file, an input; give another path")
        _check_writable(shown, real, example, overwrite)
        taken[real] = name
        if name == "output":
            taken[real + ".data"] = "output.data"


def _output_is_no_input(shown: str, real: str, model_files: list[str]) -> None:
    """Refuse an output model that (or whose data file) is the input model or its external data."""
    if not model_files:
        return
    model, data = os.path.realpath(model_files[0]), {os.path.realpath(f) for f in model_files[1:]}
    if real == model:
        raise UserError(f"{shown}: this is the input model; give another output path (the input is never overwritten)")
    if real + ".data" == model:
        raise UserError(f"{shown}: its data file would overwrite the input; choose another name")
    for target in (real, real + ".data"):
        if target in data:
            raise UserError(f"{shown}: it would overwrite {os.path.basename(target)}, the input model's external "
                            "data; give another output path")


def _check_writable(shown: str, real: str, example: str, overwrite: bool) -> None:
    """Refuse a path that is a folder or a device, in a missing folder, or an existing file."""
    if os.path.isdir(real):
        raise UserError(f"{shown}: is a folder; give {example}")
    if os.path.exists(real) and not os.path.isfile(real):
        raise UserError(f"{shown}: is not a regular file (a device or a pipe), which the atomic "
                        f"rename would replace; give {example}")
    parent = os.path.dirname(real) or "."
    if not os.path.isdir(parent):
        raise UserError(f"{shown}: folder {parent} does not exist; create it first")
    if os.path.isfile(real) and not overwrite:
        raise UserError(f"{shown}: the file exists; give another path, or {option('overwrite')} to replace it")


def write_atomically(path: str, write, binary: bool = False) -> None:
    """Write a file through a temporary one beside it, renamed into place: a reader never
    sees a partial file, and a failed write leaves nothing. ``write(f)`` writes the content."""
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxobq-", suffix=suffix, dir=folder)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes it 0600; a file written in place would not be
        os.replace(tmp, path)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def publishing(folder: str):
    """Hold back SIGINT and SIGTERM, and keep other onnxobq runs from publishing into ``folder``,
    while a model and its data file are renamed into place: the pair is never left half
    renamed, and two runs writing one output leave one run's model with that run's data.

    A signal that arrives meanwhile is recorded and handed to the handler it would have met once
    the renames are done (blocking it would not do: the kernel gives a process's signal to any
    thread that does not block it, onnxruntime's and BLAS's included). The lock is an flock of
    the folder itself (best effort: where the file system refuses it, the renames go on without).
    """
    held, pending = {}, []
    if threading.current_thread() is threading.main_thread():     # only the main thread sets handlers
        held = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    fd = None
    try:
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)       # closing the descriptor releases the lock
        for sig, handler in held.items():
            signal.signal(sig, handler)
        if pending:
            handler = held[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
