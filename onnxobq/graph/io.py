"""Load and save ONNX models: validation, external data, atomic writes."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import onnx
from onnx.external_data_helper import set_external_data

from ..errors import UserError, cannot_read, cannot_write, check_utf8_path, option
from ..files import publishing

# Protobuf cannot serialise a message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True when any initializer of the (unloaded) model lives in an external file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def load(model) -> tuple[onnx.ModelProto, str, list[str]]:
    """The model to quantize, how messages name it, and its files (none for one in memory).

    Args:
        model: a path, or an onnx.ModelProto (checked with onnx.checker, not changed).

    Raises:
        UserError: see load_model; or the ModelProto fails onnx.checker.
    """
    if isinstance(model, onnx.ModelProto):
        if not model.graph.node or not model.opset_import:
            raise UserError(f"{option('model')}: not an ONNX model (no graph or no opset); export the model again")
        try:
            onnx.checker.check_model(model)
        except ValueError:      # past 2 GiB the checker cannot serialise it: checked by onnxruntime later
            pass
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{option('model')}: the model fails onnx.checker ({first}); fix the export") from None
        check_names(model, option("model"))
        return model, option("model") + " (in memory)", []
    if not isinstance(model, (str, os.PathLike)):
        raise UserError(f"{option('model')}: a {type(model).__name__} is not a model; give the path of an .onnx "
                        "file or an onnx.ModelProto")
    path = os.fspath(model)
    check_utf8_path("model", path)
    return load_model(path), path, [path, *external_data_files(path)]


def check_names(model: onnx.ModelProto, shown: str) -> None:
    """Refuse a model whose node, tensor or value names are not valid UTF-8."""
    def names(graph):
        for node in graph.node:
            yield node.name, node.op_type, *node.input, *node.output
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from names(attr.g)
                for g in attr.graphs:
                    yield from names(g)
        for t in graph.initializer:
            yield (t.name,)
        for v in (*graph.input, *graph.output, *graph.value_info):
            yield (v.name,)
    try:        # protobuf hands such a name back as bytes, or raises where it decodes it
        bad = next((name for group in names(model.graph) for name in group if isinstance(name, bytes)), None)
    except UnicodeDecodeError as exc:
        bad = exc.object
    if bad is not None:
        raise UserError(f"{shown}: the name '{bad.decode('utf-8', 'backslashreplace')}' is not valid UTF-8, which "
                        "ONNX requires; export the model again with UTF-8 names") from None


def load_model(path: str) -> onnx.ModelProto:
    """Read and check an ONNX model, its external data included.

    Raises:
        UserError: the file is missing, unreadable, not ONNX, or fails onnx.checker.
    """
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a model file; give the path of the .onnx file in it")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such model file; give the path of an exported .onnx model")
    try:
        model = onnx.load(path, load_external_data=False)
    except PermissionError as exc:
        raise cannot_read(path, exc) from None
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__}); "
                        "export the model to ONNX again") from None
    if not model.graph.node or not model.opset_import:
        raise UserError(f"{path}: not an ONNX model (no graph or no opset); "
                        "export the model to ONNX again")
    check_names(model, path)
    try:
        onnx.checker.check_model(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: the model fails onnx.checker ({first}); fix the export") from None
    if uses_external_data(model):
        try:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as exc:
            raise UserError(f"{path}: cannot read its external data ({exc}); "
                            "keep the .data file beside the model") from None
    return model


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Approximate size of the model's weights in bytes: its initializers and the values of its
    main graph's Constant nodes (without serialising it, which fails past 2 GiB)."""
    values = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(len(t.raw_data) or 4 * len(t.float_data) for t in [*model.graph.initializer, *values])


def external_data_files(path: str) -> list[str]:
    """The external data files a model file refers to (absolute paths; [] when unreadable)."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:
        return []
    folder = os.path.dirname(os.path.abspath(path))
    files = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    files.add(os.path.join(folder, entry.value))
    return sorted(files)


@contextlib.contextmanager
def serialized(model: onnx.ModelProto, file_past: int = EXTERNAL_DATA_THRESHOLD):
    """What onnxruntime can load the model from: its bytes, or, where its weights take more
    than ``file_past`` bytes (at most protobuf's 2 GiB limit), the path of a temporary copy with
    external data (removed on exit), which onnxruntime maps instead of copying.

    The model is not changed: the copy's graph is built beside it and its large initializers
    written out one at a time. (Saving the model itself with external data and reading its
    weights back grew the model's protobuf arena by the weights' size on every session: a
    2.2 GB model's BN stage peaked at 21 GB.)
    """
    if tensor_bytes(model) <= min(file_past, EXTERNAL_DATA_THRESHOLD):
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="onnxobq-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            _write_light_copy(model, path, "model.onnx.data")
        except OSError as exc:
            raise UserError(f"{tempfile.gettempdir()}: cannot write the temporary copy of the model that onnxruntime "
                            f"reads past 2 GB ({exc.strerror or type(exc).__name__}); free space there, or set "
                            "TMPDIR to a folder with room") from None
        yield path


def _write_light_copy(model: onnx.ModelProto, path: str, location: str, threshold: int = 1024) -> None:
    """Write ``model`` to ``path`` with its main graph's initializers over ``threshold`` bytes in
    ``location`` beside it, without changing ``model``."""
    light = onnx.ModelProto()
    light.CopyFrom(shell_of(model))
    graph = light.graph
    with open(os.path.join(os.path.dirname(path), location), "wb") as data:
        for t in model.graph.initializer:
            if not t.HasField("raw_data") or t.ByteSize() <= threshold:
                graph.initializer.append(t)
                continue
            offset = data.tell()
            data.write(t.raw_data)
            out = graph.initializer.add()
            out.name, out.data_type = t.name, t.data_type
            out.dims.extend(t.dims)
            out.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(data.tell() - offset))):
                out.external_data.add(key=key, value=value)
    with open(path, "wb") as f:
        f.write(light.SerializeToString())


def shell_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its main graph's initializers."""
    shell = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(shell, name, getattr(model, name))
    shell.opset_import.extend(model.opset_import)
    shell.metadata_props.extend(model.metadata_props)
    shell.functions.extend(model.functions)
    graph, source = shell.graph, model.graph
    graph.name, graph.doc_string = source.name, source.doc_string
    for name in ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation"):
        getattr(graph, name).extend(getattr(source, name))
    return shell


def _initializers(graph: onnx.GraphProto):
    """The initializers of a graph and of the graphs in its nodes' attributes."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _initializers(sub)


def save_model(model: onnx.ModelProto, path: str, external: bool | None = None) -> list[str]:
    """Write a model atomically: to a temporary folder beside ``path``, checked, then renamed.

    Args:
        model: the model (modified in place when written with external data).
        path: the final file name.
        external: write the weights to ``<name>.data`` beside it (all of them, as an
            input stored that way). None (default) decides by size: external data, for
            tensors over 1 KB, when the weights approach protobuf's 2 GiB limit.

    Returns:
        The files written (the model first).
    """
    threshold = 0
    if external is None:
        external, threshold = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD, 1024
    out_dir = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=".onnxobq-", dir=out_dir)
        tmp_model = os.path.join(tmp, name)
        if external:    # marked here: onnx's own marking refuses a data file of that name in the working directory
            for tensor in _initializers(model.graph):
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
                    set_external_data(tensor, name + ".data")
        onnx.save_model(model, tmp_model)
        if os.path.exists(tmp_model + ".data"):     # onnx writes it 0600; the model beside it gets the umask's mode
            os.chmod(tmp_model + ".data", os.stat(tmp_model).st_mode & 0o777)
        onnx.checker.check_model(tmp_model)
        written = []
        try:
            with publishing(out_dir):
                if os.path.exists(os.path.join(tmp, name + ".data")):   # absent if every tensor was small
                    os.replace(os.path.join(tmp, name + ".data"), os.path.join(out_dir, name + ".data"))
                    written.append(os.path.join(out_dir, name + ".data"))
                os.replace(tmp_model, os.path.join(out_dir, name))
                written.insert(0, os.path.join(out_dir, name))
        except BaseException:       # an interrupt held back until the pair was in place: none of it stays
            for path in written:
                os.unlink(path)
            raise
        return written
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
