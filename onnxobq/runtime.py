"""onnxruntime: the one edge where models run, for the capture, BatchNorm and compare.

Sessions are built from a model (its bytes, or a temporary file past protobuf's 2 GiB),
given extra outputs where a stage reads inner tensors, and run with errors that name the
calibration batch. Two sessions of a small model can run batch-1 samples side by side.
"""
from __future__ import annotations

import functools
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from .backend import Device
from .errors import UserError, in_context
from .export.opset import model_opset
from .graph.io import serialized, tensor_bytes
from .types import InputSpec, fmt_shape


# onnxruntime's default logger prints its errors on stderr beside onnxobq's one line, which
# carries their message: only fatal ones.
ort.set_default_logger_severity(4)


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs by old exporters are left out)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


def providers(runtime: str) -> list[str]:
    """onnxruntime providers: CUDA when onnxruntime-gpu is installed and the GPU is wanted."""
    if runtime != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# Models whose weights take more than this reach onnxruntime as a file with external data, which
# it maps, and without prepacking, which copies MatMul weights: a session of a 238 MB model holds
# 487 MB made from its bytes, 248 MB from the file and 10 MB from the file without prepacking
# (python scripts/memory_bench.py --pieces).
FILE_SESSION_BYTES = 64 << 20


def session_options(spin: bool = True, prepack: bool = True) -> ort.SessionOptions:
    """onnxruntime options that run a QDQ model as its ONNX graph says.

    By default onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits with
    accuracy level 4, which also quantizes the activations to int8 at run time. Level 1
    keeps them in float32, so what is measured is the effect of the weights alone.

    Args:
        spin: let onnxruntime's idle threads spin for the next operator. Turn it off
            where NumPy's BLAS shares the cores between forward passes.
        prepack: let onnxruntime keep packed copies of MatMul weights (see FILE_SESSION_BYTES).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 4     # fatal only: onnxobq's one-line errors carry onnxruntime's message
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def session(model: onnx.ModelProto, extra: dict[str, int], runtime: str = "cpu",
            spin: bool = True, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` that also returns the tensors in ``extra``.

    Args:
        model: the model; its outputs are restored before returning.
        extra: tensor name -> ONNX element type, for tensors to expose as outputs.
        runtime: "cpu", "cuda" or "auto" (see providers).
        spin: see session_options.
        threads: onnxruntime's intra-op threads (None: its default, one per core).
    """
    have = {o.name for o in model.graph.output}
    added = [onnx.helper.make_tensor_value_info(n, t, None) for n, t in extra.items() if n not in have]
    model.graph.output.extend(added)
    large = tensor_bytes(model) > FILE_SESSION_BYTES
    opts = session_options(spin, prepack=not large)
    if threads is not None:
        opts.intra_op_num_threads = threads
    try:
        with serialized(model, FILE_SESSION_BYTES) as source:
            return ort.InferenceSession(source, opts, providers=providers(runtime))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"onnxruntime cannot run the model ({_one_line(exc)}); "
                        "check that it runs with onnxruntime before quantizing") from None
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]


@functools.cache
def newest_opset(qdq: bool = False) -> int:
    """The newest default-domain opset at which the installed onnxruntime (CPU) loads a model,
    or with ``qdq`` runs per-channel QuantizeLinear and DequantizeLinear: found by loading a
    small model at each opset down from onnx's newest. onnxruntime 1.32 loads opset 28 but
    has those two ops only up to 27."""
    for opset in range(onnx.defs.onnx_opset_version(), 1, -1):
        if _loads(_probe(opset, qdq)):
            return opset
    return 1


def check_opset(model: onnx.ModelProto, name: str, qdq: bool, fix: str, qdq_fix: str = "") -> None:
    """Refuse a model whose opset the installed onnxruntime does not run (``qdq``: with the
    QDQ nodes onnxobq writes), naming it and ``fix`` (and ``qdq_fix`` where only the QDQ nodes
    are out of reach)."""
    opset = model_opset(model)
    if opset > (newest := newest_opset(False)):
        what = "runs"
    elif qdq and opset > (newest := newest_opset(True)):
        what, fix = "runs QuantizeLinear and DequantizeLinear", fix + qdq_fix
    else:
        return
    raise UserError(f"{name}: opset {opset} is newer than the installed onnxruntime {ort.__version__} {what} "
                    f"(up to {newest}); {fix}, or install a newer onnxruntime")


def _probe(opset: int, qdq: bool) -> onnx.ModelProto:
    """x (1, 2) -> y: Identity, or quantized x times per-channel dequantized weights."""
    from onnx import TensorProto, helper, numpy_helper
    if qdq:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["w", "ws"], ["wq"], axis=1),
                 helper.make_node("MatMul", ["xq", "wq"], ["y"])]
        inits = [numpy_helper.from_array(np.float32(1), "s"), numpy_helper.from_array(np.ones((2, 2), np.int8), "w"),
                 numpy_helper.from_array(np.ones(2, np.float32), "ws")]
    else:
        nodes, inits = [helper.make_node("Identity", ["x"], ["y"])], []
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _loads(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime's CPU provider loads and runs a model fed ones (see check_runs)."""
    try:
        check_runs(model.SerializeToString(), {"x": np.ones((1, 2), np.float32)}, "the probe", "")
        return True
    except UserError:
        return False


def check_runs(source, feed: dict | None, what: str, fix: str) -> None:
    """Check that onnxruntime loads a written model (``source``: its path or bytes) with its
    default options, and runs ``feed`` where one is given; a UserError naming ``what`` and
    ``fix`` otherwise."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        if feed is not None:
            sess.run(None, feed)
    except Exception as exc:
        raise UserError(f"{what} does not run in onnxruntime {ort.__version__} with its default options "
                        f"({_one_line(exc)}); {fix}") from None


def session_workers(device: Device, batch: int, model_bytes: int = 0) -> tuple[int, int | None]:
    """How many sessions of a model run its batches side by side (see side_by_side), and
    onnxruntime's threads for each (None: its default).

    Two, on half the cores each, where the CPU provider runs one sample at a time: its threads
    find little to share in one sample. On the 2-core machine, 48 images through the YOLOX
    detector (fixed batch 1) took 1.86 to 2.04 s on two 1-thread sessions against 2.39 to
    2.91 s on one session, alternating, and its BN stage (128 images) 28.7 and 29.0 s
    against 34.5 and 36.2 s. ResNet-50 in batches of 8 took the same either way, so larger
    batches keep one session, and so do models of more than Tuning.side_model_bytes. Used by
    the BN passes and by compare, not by the capture (see capture.capture_hessians).
    """
    if (batch == 1 and device.cores >= 2 and model_bytes <= device.tuning.side_model_bytes
            and providers(device.runtime)[0] == "CPUExecutionProvider"):
        return 2, device.cores // 2
    return 1, None


def side_sessions(model: onnx.ModelProto, extra: dict[str, int], device: Device, batch: int,
                  spin: bool = True) -> list:
    """The sessions of ``model`` that session_workers asks for, for batches of ``batch`` samples."""
    workers, threads = session_workers(device, batch, tensor_bytes(model))
    return [session(model, extra, device.runtime, spin=spin, threads=threads) for _ in range(workers)]


def side_by_side(fn: Callable, items: Iterable, states: list) -> Iterator:
    """``fn(state, item)`` for each item, as many items at a time as there are states, each on
    its own thread with its own state (its sessions); the results in the items' order.

    onnxruntime releases the GIL while it runs, and so do NumPy's reductions, so the items
    of a group run side by side. Each group finishes before the next starts, so the items
    are read in the caller's thread between groups and at most len(states) results are held.
    With one state the items run inline.
    """
    if len(states) == 1:
        for item in items:
            yield fn(states[0], item)
        return
    items = iter(items)
    with ThreadPoolExecutor(len(states), thread_name_prefix="onnxobq-run") as pool:
        while group := list(itertools.islice(items, len(states))):
            yield from list(pool.map(in_context(fn), states[:len(group)], group))


def run(sess: ort.InferenceSession, names: list[str], feed: dict) -> dict[str, np.ndarray]:
    """Run a session, turning a bad feed into a UserError that names the input, and a failure
    inside the model into one that says so."""
    try:
        return dict(zip(names, sess.run(names, feed)))
    except Exception as exc:
        mismatch = _feed_mismatch(sess, feed)
        if mismatch:
            raise UserError(f"onnxruntime rejected the calibration batch ({mismatch}); "
                            "check the calibration data's shapes and dtypes against the model inputs") from None
        raise UserError(f"onnxruntime failed inside the model on a calibration batch that fits its inputs "
                        f"({_one_line(exc)}); check that the model runs in onnxruntime on this data") from None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, without onnxruntime's boilerplate."""
    text = " ".join(str(exc).replace("Please fix either the inputs/outputs or the model.", "").split())
    text = text.replace("[ONNXRuntimeError] : ", "")
    return (text[:limit] + "...") if len(text) > limit else (text or type(exc).__name__)


def _feed_mismatch(sess, feed: dict) -> str | None:
    """Which fed array does not fit which model input, as onnxruntime sees them (None if all fit)."""
    try:
        for spec in sess.get_inputs():
            a = feed.get(spec.name)
            if a is None:
                return f"no data for input '{spec.name}'"
            want = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
            if len(want) != a.ndim or any(w is not None and w != g for w, g in zip(want, a.shape)):
                return f"input '{spec.name}' is {fmt_shape(want)}, the batch has shape {list(a.shape)}"
    except Exception:
        return None
    return None
