"""Seeded random small ONNX models and random quantization settings, for the fuzz suite.

``random_model(rng)`` draws a small valid model: a chain with branches of Conv (1-D, 2-D and
3-D; grouped, depthwise, dilated, strided, padded or auto-padded), Gemm (transA, transB,
alpha, beta, constant A), MatMul (2-D and 3-D activations, weight first), BatchNormalization
(also on a graph input), Relu, Add, Concat, pooling, Flatten and Reshape, with random shapes,
attributes, weights (some with a zero channel or an extreme scale), a symbolic or fixed batch,
weights in initializers or Constant nodes, and opset 11 to 21. Each model passes
``onnx.checker.check_model(full_check=True)`` and runs in onnxruntime; a draw that does not
(none is expected) is drawn again from the same generator, so a seed always gives one model.

``random_settings(rng, model)`` draws keyword arguments for ``onnxobq.quantize``, including
combinations that onnxobq refuses with a one-line error: those are allowed outcomes.

Only numpy, onnx and onnxruntime are used, so the script and the tests share it
(``scripts/fuzz.py`` adds ``tests/`` to ``sys.path``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MAX_ELEMENTS = 4096       # activation elements per sample: keeps a case well under a second
MAX_FEATURES = 256        # inputs of a Gemm/MatMul, and of a Flatten feeding one
OPSETS = (11, 13, 17, 21)
METHODS = ("fastobq", "gptq", "obq", "rtn")
ORDERS = ("sensi_des", "sensi_asc", "err_des", "err_asc", "w_des", "w_asc", "act", "none")


class Tensor(NamedTuple):
    """An activation of the graph being built: its name and shape (shape[0] is the batch)."""
    name: str
    shape: tuple


@dataclass
class Builder:
    """The graph under construction: nodes, initializers and the activations available."""
    rng: np.random.Generator
    batch: object                                   # "N" (symbolic), "?" (no name) or a fixed size
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    pool: list = field(default_factory=list)        # Tensors that ops may read
    used: set = field(default_factory=set)          # names read by some node
    count: int = 0

    def fresh(self, prefix: str) -> str:
        """A new tensor or node name."""
        self.count += 1
        return f"{prefix}{self.count}"

    def chance(self, p: float) -> bool:
        """True with probability p."""
        return bool(self.rng.random() < p)

    def pick(self, options):
        """One of ``options``, uniformly."""
        return options[int(self.rng.integers(len(options)))]

    def const(self, prefix: str, values: np.ndarray, node_prob: float = 0.0) -> str:
        """A float constant as an initializer, or (with ``node_prob``) a Constant node's output."""
        name = self.fresh(prefix)
        tensor = numpy_helper.from_array(np.asarray(values, np.float32), name)
        if self.chance(node_prob):
            tensor.name = name + "_value"
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor, name=name + "_const"))
        else:
            self.inits.append(tensor)
        return name

    def node(self, op: str, inputs: list, out_shape: tuple, **attrs) -> Tensor:
        """Append ``op`` reading ``inputs`` (names); its output joins the pool."""
        out = Tensor(self.fresh(op.lower() + "_out"), tuple(out_shape))
        name = self.fresh(op.lower()) if self.chance(0.7) else ""   # unnamed nodes get onnxobq's names
        self.nodes.append(helper.make_node(op, inputs, [out.name], name=name, **attrs))
        self.used.update(inputs)
        self.pool.append(out)
        return out


def elements(shape) -> int:
    """Elements per sample (all but the batch axis)."""
    return int(np.prod(shape[1:], dtype=np.int64))


def weight(b: Builder, shape: tuple, fan_in: int) -> np.ndarray:
    """Weights of unit gain, now and then with a zero or constant output channel, or scaled far
    from 1 (zero channels and extreme scales are where grids and Hessians break)."""
    w = b.rng.standard_normal(shape) * b.rng.uniform(0.5, 1.5) / np.sqrt(max(fan_in, 1))
    kind = b.rng.random()
    if kind < 0.08:
        w[int(b.rng.integers(shape[0]))] = 0.0
    elif kind < 0.12:
        w[int(b.rng.integers(shape[0]))] = w.flat[0]
    elif kind < 0.16:
        w *= b.pick([1e-6, 1e3])
    return w.astype(np.float32)


def _conv_dim(b: Builder, s: int, auto: str):
    """Kernel, stride, dilation, pads and output size of one spatial dimension of size ``s``."""
    k = int(b.rng.integers(1, min(3, s + 1) + 1))
    stride = b.pick([1, 1, 1, 2, 2, 3])
    if auto.startswith("SAME"):                              # onnxruntime: no dilation with SAME_*
        return k, stride, 1, (0, 0), -(-s // stride)
    d = 2 if k > 1 and b.chance(0.25) else 1
    span = d * (k - 1) + 1
    pads = (0, 0) if auto == "VALID" else tuple(int(p) for p in b.rng.integers(0, span, 2))
    if s + sum(pads) < span:                                 # too small for this kernel: a 1-tap one
        return 1, stride, 1, (0, 0), (s - 1) // stride + 1
    return k, stride, d, pads, (s + sum(pads) - span) // stride + 1


def add_conv(b: Builder, x: Tensor) -> Tensor:
    """A Conv of rank len(x.shape) - 2: grouped or depthwise now and then, with random kernel,
    stride, dilation and pads (explicit or auto_pad), and a bias or none."""
    c, spatial = x.shape[1], x.shape[2:]
    auto = b.pick(["NOTSET"] * 6 + ["SAME_UPPER", "SAME_LOWER", "VALID"])
    dims = [_conv_dim(b, s, auto) for s in spatial]
    divisors = [g for g in range(1, c + 1) if c % g == 0]
    g = c if b.chance(0.25) else (b.pick(divisors) if b.chance(0.3) else 1)
    out_spatial = tuple(dim[4] for dim in dims)
    room = max(1, MAX_ELEMENTS // (g * int(np.prod(out_spatial))))
    co = g * int(b.rng.integers(1, min(room, max(1, 16 // g)) + 1))
    kernel = tuple(dim[0] for dim in dims)
    w = weight(b, (co, c // g) + kernel, (c // g) * int(np.prod(kernel)))
    inputs = [x.name, b.const("w", w, node_prob=0.2)]
    if b.chance(0.6):
        inputs.append(b.const("bias", b.rng.standard_normal(co) * 0.1))
    attrs = dict(strides=[dim[1] for dim in dims], dilations=[dim[2] for dim in dims])
    if auto != "NOTSET" or b.chance(0.2):
        attrs["auto_pad"] = auto
    if auto == "NOTSET":
        attrs["pads"] = [dim[3][0] for dim in dims] + [dim[3][1] for dim in dims]
    if g > 1 or b.chance(0.3):
        attrs["group"] = g
    if b.chance(0.5):
        attrs["kernel_shape"] = list(kernel)
    return b.node("Conv", inputs, (x.shape[0], co) + out_spatial, **attrs)


def add_gemm(b: Builder, x: Tensor) -> Tensor:
    """A Gemm on (N, F): transB either way, alpha and beta, a bias of any broadcastable shape or
    none, the activation transposed first (transA), or the weight as input A (left in float)."""
    f = x.shape[1]
    co = int(b.rng.integers(1, 33))
    attrs = {}
    if b.chance(0.5):
        attrs["alpha"] = float(b.rng.uniform(0.25, 2.0))
    w = weight(b, (co, f), f)
    bias_shapes = [None, (co,), (1, co), (1,), ()]
    bias_shape = bias_shapes[int(b.rng.integers(len(bias_shapes)))]
    if b.chance(0.1):                                  # Y^T = W X^T: the constant is A
        inputs = [b.const("w", w, 0.2), x.name]
        y = b.node("Gemm", inputs, (co, x.shape[0]), transB=1, **attrs)
        b.pool.pop()
        return b.node("Transpose", [y.name], (x.shape[0], co), perm=[1, 0])
    trans_b = b.chance(0.5)
    a = x.name
    if b.chance(0.2):
        t = b.node("Transpose", [x.name], (f, x.shape[0]), perm=[1, 0])
        b.pool.pop()
        a, attrs["transA"] = t.name, 1
    inputs = [a, b.const("w", w if trans_b else w.T, 0.2)]
    if bias_shape is not None:
        inputs.append(b.const("bias", b.rng.standard_normal(bias_shape) * 0.1))
        if b.chance(0.5):
            attrs["beta"] = float(b.rng.uniform(0.25, 2.0))
    if trans_b or b.chance(0.3):
        attrs["transB"] = int(trans_b)
    return b.node("Gemm", inputs, (x.shape[0], co), **attrs)


def add_matmul(b: Builder, x: Tensor) -> Tensor:
    """A MatMul of an (N, F) or (N, T, F) activation by an (F, K) weight, or now and then with
    the weight first."""
    f = x.shape[-1]
    if len(x.shape) == 3 and b.chance(0.1):            # (T2, T) @ (N, T, F): the constant is first
        t2 = int(b.rng.integers(1, 9))
        w = b.const("w", weight(b, (t2, x.shape[1]), x.shape[1]), 0.2)
        return b.node("MatMul", [w, x.name], (x.shape[0], t2, f))
    room = max(1, MAX_ELEMENTS // elements(x.shape[:-1] + (1,)))
    k = int(b.rng.integers(1, min(32, room) + 1))
    name = b.const("w", weight(b, (f, k), f), 0.2)
    return b.node("MatMul", [x.name, name], x.shape[:-1] + (k,))


def add_batchnorm(b: Builder, x: Tensor) -> Tensor:
    """BatchNormalization over axis 1 with random statistics (variance kept away from 0)."""
    c = x.shape[1]
    stats = [b.rng.uniform(0.5, 1.5, c), b.rng.standard_normal(c) * 0.2,
             b.rng.standard_normal(c) * 0.3, b.rng.uniform(0.3, 2.0, c)]
    names = [b.const(p, v) for p, v in zip(("bn_scale", "bn_bias", "bn_mean", "bn_var"), stats)]
    attrs = {"epsilon": float(b.pick([1e-5, 1e-3]))} if b.chance(0.3) else {}
    return b.node("BatchNormalization", [x.name] + names, x.shape, **attrs)


def add_pool(b: Builder, x: Tensor) -> Tensor:
    """MaxPool or AveragePool (kernel up to 3, stride up to 2, pads below the kernel), or a
    global pool."""
    if b.chance(0.3):
        op = b.pick(["GlobalAveragePool", "GlobalMaxPool"])
        return b.node(op, [x.name], x.shape[:2] + (1,) * (len(x.shape) - 2))
    ks, strides, pads, out = [], [], [], []
    for s in x.shape[2:]:
        k = int(b.rng.integers(1, min(3, s) + 1))
        st = int(b.rng.integers(1, 3))
        p = int(b.rng.integers(0, k)) if k > 1 and b.chance(0.4) else 0
        ks.append(k), strides.append(st), pads.append(p), out.append((s + 2 * p - k) // st + 1)
    op = b.pick(["MaxPool", "AveragePool"])
    attrs = dict(kernel_shape=ks, strides=strides, pads=pads + pads)
    if op == "AveragePool" and b.chance(0.5):
        attrs["count_include_pad"] = 1
    return b.node(op, [x.name], x.shape[:2] + tuple(out), **attrs)


def add_flatten(b: Builder, x: Tensor) -> Tensor:
    """Flatten from axis 1, after a global average pool where there would be too many features."""
    if elements(x.shape) > MAX_FEATURES:
        x = b.node("GlobalAveragePool", [x.name], x.shape[:2] + (1,) * (len(x.shape) - 2))
    return b.node("Flatten", [x.name], (x.shape[0], elements(x.shape)), axis=1)


def add_reshape(b: Builder, x: Tensor) -> Tensor:
    """(N, F) -> (N, T, F / T), to give a MatMul a 3-D activation (0 keeps the batch)."""
    f = x.shape[1]
    t = b.pick([d for d in range(1, f + 1) if f % d == 0])
    shape = b.fresh("shape")
    b.inits.append(numpy_helper.from_array(np.array([0, t, -1], np.int64), shape))
    return b.node("Reshape", [x.name, shape], (x.shape[0], t, f // t))


def add_add(b: Builder, x: Tensor) -> Tensor:
    """x + another activation of the same shape (a residual branch), or + a constant that
    broadcasts over some axes."""
    partners = [t for t in b.pool if t.shape == x.shape]
    if b.chance(0.7):
        return b.node("Add", [x.name, b.pick(partners).name], x.shape)
    shape = tuple(d if b.chance(0.5) else 1 for d in x.shape[1:])
    return b.node("Add", [x.name, b.const("c", b.rng.standard_normal(shape) * 0.1)], x.shape)


def add_concat(b: Builder, x: Tensor) -> Tensor:
    """Concat of x with an activation that matches it but on the axis, or with x itself."""
    axis = int(b.rng.integers(1, len(x.shape)))
    rest = lambda t: t.shape[:axis] + t.shape[axis + 1:] if len(t.shape) == len(x.shape) else None  # noqa: E731
    partner = b.pick([t for t in b.pool if rest(t) == rest(x)])
    if elements(x.shape) + elements(partner.shape) > MAX_ELEMENTS:
        return b.node("Relu", [x.name], x.shape)
    shape = list(x.shape)
    shape[axis] += partner.shape[axis]
    if b.chance(0.3):
        axis -= len(x.shape)                                # a negative axis
    return b.node("Concat", [x.name, partner.name], tuple(shape), axis=axis)


def add_twin(b: Builder, x: Tensor) -> Tensor:
    """A copy of an earlier Conv, Gemm or MatMul (same attributes, weight and bias) on another
    activation of the same shape: one weight shared by two nodes. Else a Relu."""
    shapes = {t.name: t.shape for t in b.pool}
    twins = [n for n in b.nodes if n.op_type in LAYERS and shapes.get(n.input[0]) == x.shape
             and n.input[0] != x.name and n.output[0] in shapes]
    if not twins:
        return add_relu(b, x)
    n = b.pick(twins)
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    return b.node(n.op_type, [x.name] + list(n.input[1:]), shapes[n.output[0]], **attrs)


def add_relu(b: Builder, x: Tensor) -> Tensor:
    """Relu, the activation between layers."""
    return b.node("Relu", [x.name], x.shape)


LAYERS = {"Conv": add_conv, "Gemm": add_gemm, "MatMul": add_matmul}
# The ops that may follow an activation of each rank, repeated for weight.
COMMON = [add_batchnorm, add_relu, add_add, add_concat, add_twin]
STEPS = {2: [add_gemm] * 3 + [add_matmul] * 3 + COMMON + [add_reshape],
         3: [add_conv] * 3 + [add_matmul] * 2 + COMMON + [add_pool, add_flatten],
         4: [add_conv] * 4 + COMMON + [add_pool, add_flatten],
         5: [add_conv] * 4 + COMMON + [add_pool, add_flatten]}
INPUT_SIZES = {2: [(4, 128)], 3: [(1, 8), (4, 32)], 4: [(1, 6), (3, 12), (3, 12)],
               5: [(1, 4), (2, 6), (2, 6), (2, 6)]}


def _graph_input(b: Builder, name: str, shape: tuple) -> Tensor:
    """A float graph input; it joins the pool."""
    batch = None if b.batch == "?" else b.batch
    b.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, (batch,) + shape[1:]))
    x = Tensor(name, shape)
    b.pool.append(x)
    return x


def _draw(rng: np.random.Generator) -> onnx.ModelProto:
    """One random model (not yet checked)."""
    b = Builder(rng, batch=("N", "N", "N", "?", 1, 2)[int(rng.integers(6))])
    rank = b.pick([2, 3, 3, 4, 4, 4, 5])
    shape = (b.batch,) + tuple(int(rng.integers(lo, hi + 1)) for lo, hi in INPUT_SIZES[rank])
    x = _graph_input(b, b.pick(["x", "x", "input.1", "images"]), shape)
    if b.chance(0.15):
        _graph_input(b, "x2", shape)
    if b.chance(0.15):
        x = add_batchnorm(b, x)                             # BatchNormalization on a graph input
    for _ in range(int(rng.integers(2, 10))):
        x = x if b.chance(0.7) else b.pick(b.pool)
        x = b.pick(STEPS[len(x.shape)])(b, x)
    if not any(n.op_type in LAYERS for n in b.nodes) and b.chance(0.95):
        x = (add_conv if len(x.shape) > 2 else b.pick([add_gemm, add_matmul]))(b, x)
    return _assemble(b, opset=b.pick(OPSETS))


def _assemble(b: Builder, opset: int) -> onnx.ModelProto:
    """The model whose outputs are the activations no node reads, and now and then one that a
    node reads too (a Conv output that is also a graph output cannot take a folded BN)."""
    batch = None if b.batch == "?" else b.batch
    inputs = {i.name for i in b.inputs}
    shown = [t for t in b.pool if t.name not in b.used and t.name not in inputs]
    inner = [t for t in b.pool if t.name in b.used and t.name not in inputs]
    if inner and b.chance(0.2):
        shown.insert(0, b.pick(inner))
    outputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, (batch,) + t.shape[1:]) for t in shown]
    graph = helper.make_graph(b.nodes, "fuzz", b.inputs, outputs or [b.inputs[0]], b.inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxobq-fuzz")
    model.ir_version = helper.find_min_ir_version_for(opsets)
    return model


def feeds(model: onnx.ModelProto, rng: np.random.Generator, batch: int = 3) -> dict:
    """Standard-normal inputs for every graph input (``batch`` samples where it is not fixed)."""
    out = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def problem(model: onnx.ModelProto) -> str | None:
    """Why ``model`` is not a valid fuzz model (checker, onnxruntime, finite outputs), or None."""
    import onnxruntime as ort
    try:
        onnx.checker.check_model(model, full_check=True)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        ys = session.run(None, feeds(model, np.random.default_rng(0)))
    except Exception as e:                                  # noqa: BLE001 - any failure is a bad draw
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None if all(np.isfinite(y).all() for y in ys) else "non-finite outputs"


def random_model(rng: np.random.Generator, tries: int = 20) -> onnx.ModelProto:
    """A small random model that passes onnx's full check and runs in onnxruntime.

    Args:
        rng: the generator; the same state always gives the same model.
        tries: draws before giving up (a draw that fails the checks is replaced by the next).

    Returns:
        the model (opset 11 to 21, IR version the least its opset needs).
    """
    why = None
    for _ in range(tries):
        model = _draw(rng)
        why = problem(model)
        if why is None:
            return model
    raise RuntimeError(f"no valid model in {tries} draws; the last: {why}")


def _calibration(rng: np.random.Generator, model: onnx.ModelProto) -> dict:
    """The calibration settings: "random" (with or without sizes for the dynamic dimensions),
    arrays in memory (a dict, or one array for a single input; now and then float64, a single
    sample, or short of an input), or none (rtn needs none)."""
    kind = rng.choice(["random", "arrays", "arrays", "none"], p=[0.35, 0.3, 0.3, 0.05])
    if kind == "none":
        return {}
    if kind == "random":
        dynamic = {vi.name: tuple(d.dim_value or 2 for d in vi.type.tensor_type.shape.dim)
                   for vi in model.graph.input if any(not d.dim_value for d in vi.type.tensor_type.shape.dim)}
        shapes = {"input_shapes": dynamic} if dynamic and rng.random() < 0.85 else {}
        return {"calibration": "random", "seed": int(rng.integers(0, 100)), **shapes}
    arrays = feeds(model, rng, batch=int(rng.integers(2, 13)))
    variant = rng.random()
    if variant < 0.1:                                      # float64 arrays
        arrays = {k: v.astype(np.float64) for k, v in arrays.items()}
    elif variant < 0.2:                                    # one sample, without the batch axis
        arrays = {k: v[0] for k, v in arrays.items()}
    elif variant < 0.25 and len(arrays) > 1:               # an input missing: refused
        arrays.popitem()
    if len(arrays) == 1 and rng.random() < 0.3:
        return {"calibration": next(iter(arrays.values()))}
    return {"calibration": arrays}


def _grid(rng: np.random.Generator) -> dict:
    """Bits, method, order, damping, blocks and the grid's options, each now and then."""
    s = {"bits": int(rng.integers(2, 9)), "method": str(rng.choice(METHODS))}
    maybe = {"order": lambda: str(rng.choice(ORDERS)), "damp": lambda: float(rng.choice([1e-6, 0.1, 1.0])),
             "damp_mode": lambda: "absolute", "block": lambda: int(rng.integers(1, 17)),
             "symmetric": lambda: False, "narrow_range": lambda: True, "scale_search": lambda: "mse",
             "group_size": lambda: int(rng.choice([1, 2, 3, 4, 8, 16, 32, 128])),
             "opset": lambda: int(rng.choice([10, 13, 17, 19, 21])), "precision": lambda: "float32"}
    odds = {"order": 0.2, "damp": 0.1, "damp_mode": 0.1, "block": 0.2, "symmetric": 0.25, "narrow_range": 0.15,
            "scale_search": 0.15, "group_size": 0.3, "opset": 0.15, "precision": 0.1}
    s.update({k: make() for k, make in maybe.items() if rng.random() < odds[k]})
    return s


def _layers_and_bn(rng: np.random.Generator) -> dict:
    """Activation bits, BatchNorm options and layer selection, each now and then."""
    globs = ["conv*", "*gemm*", "matmul*", "Conv_*", "w*", "nomatch", "*"]
    maybe = {"act_bits": lambda: 8, "act_calib": lambda: str(rng.choice(["max", "percentile", "mse"])),
             "act_exclude": lambda: [str(rng.choice(globs))], "bn_reestimate": lambda: False,
             "bn_mode": lambda: "reestimate", "bn_fold": lambda: False, "bn_correct": lambda: False,
             "bn_samples": lambda: None if rng.random() < 0.3 else int(rng.integers(1, 9)),
             "exclude": lambda: [str(rng.choice(globs))],
             "op_types": lambda: [str(op) for op in rng.choice(["Conv", "Gemm", "MatMul"], int(rng.integers(1, 3)),
                                                               replace=False)],
             "layer_bits": lambda: [(str(rng.choice(globs)), int(rng.integers(2, 9)))],
             "layer_group_size": lambda: [(str(rng.choice(globs)), int(rng.choice([0, 2, 4, 16])))],
             "samples": lambda: int(rng.integers(1, 9)), "batch_size": lambda: int(rng.integers(1, 5))}
    odds = {"act_bits": 0.3, "act_calib": 0.2, "act_exclude": 0.1, "bn_reestimate": 0.25, "bn_mode": 0.15,
            "bn_fold": 0.15, "bn_correct": 0.15, "bn_samples": 0.3, "exclude": 0.1, "op_types": 0.15,
            "layer_bits": 0.1, "layer_group_size": 0.1, "samples": 0.3, "batch_size": 0.3}
    return {k: make() for k, make in maybe.items() if rng.random() < odds[k]}


def random_settings(rng: np.random.Generator, model: onnx.ModelProto) -> dict:
    """Random keyword arguments for ``onnxobq.quantize(model, ...)``.

    Bits 2 to 8, any method, format "fake" or "qdq", and now and then each other setting
    (group size, act_bits, BatchNorm options, layer selection, ...). Some combinations are
    refused by onnxobq with a one-line error; the fuzz harness accepts that outcome.

    Args:
        rng: the generator; the same state always gives the same settings.
        model: the model they are for (calibration arrays take its input names and shapes).
    """
    settings = {**_calibration(rng, model), **_grid(rng), **_layers_and_bn(rng),
                "format": str(rng.choice(["fake", "qdq"])), "device": "cpu"}
    # Settings that need another are mostly given with it, so that most runs get past the checks.
    if "act_bits" not in settings and ("act_calib" in settings or "act_exclude" in settings) \
            and rng.random() < 0.9:
        settings["act_bits"] = 8
    if settings["method"] in ("rtn", "obq") and "order" in settings and rng.random() < 0.9:
        del settings["order"]
    if settings["method"] != "rtn" and "calibration" not in settings:
        settings["method"] = "rtn" if rng.random() < 0.8 else settings["method"]
    return settings
