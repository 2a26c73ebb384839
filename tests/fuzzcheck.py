"""The fuzz check: quantize one random model through the command line and judge the result.

``check_case(seed, index, workdir)`` draws model ``index`` of ``seed`` (tests/fuzzmodels.py)
and one set of settings, runs ``onnxobq quantize`` with them twice, once with ``--format fake``
and once with ``--format qdq`` (now and then from the Hessians that the first run saved), and
returns what went wrong:

- the exit status is 0, or 2 with exactly one line on stderr (``onnxobq: error: ...``) and no
  output file left behind; never a traceback or another status;
- an output passes ``onnx.checker.check_model(full_check=True)``, runs in a default
  onnxruntime session, and gives the float model's output shapes;
- no output is non-finite where the float model's output is finite;
- where both formats succeed, their outputs agree with onnxruntime's optimizations off.

The runs are in-process (``onnxobq.cli.main``, as tests/test_cli.py calls it); with
``subprocess=True`` the first one goes through ``python -m onnxobq`` to see the real stderr,
and now and then the second calls ``onnxobq.quantize`` with the calibration arrays in memory
(a UserError counts as a one-line exit 2).
tests/test_fuzz.py and scripts/fuzz.py both call ``check_case``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess as sp
import sys
import traceback
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from fuzzmodels import feeds, random_model, random_settings

# fake and qdq hold the same grid values, but fake stores s * (q - z) rounded once to float32
# while DequantizeLinear computes it at run time, so a weight may differ in its last bit (6e-8
# relative). Over 600 cases where both formats ran, the largest |fake - qdq| was 3.4e-7 of the
# largest |output| of the float model. A wrong code, scale or zero-point moves an output by a
# grid step of a weight times its input: 1e-2 of that range or more at 8 bits on these small
# layers. 1e-4 of the range sits 300 times above the float noise and well below a real mismatch.
AGREE_RTOL = 1e-4
# Where activations are quantized too, an input that lands on a rounding tie by float noise
# may take the next code, so a few elements may move by one activation step; see agree().
AGREE_FLIP_SHARE = 0.01


@dataclass
class Run:
    """One command-line run: exit status, stdout, stderr and, where one escaped, the traceback."""
    code: int | None
    out: str
    err: str
    trace: str = ""
    warnings: list = field(default_factory=list)


@dataclass
class CaseResult:
    """What one case found: ``problems`` fail it; ``notes`` (refusals, warnings) do not."""
    seed: int
    index: int
    settings: dict
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    codes: dict = field(default_factory=dict)        # format -> exit status (None: a traceback)
    argv: dict = field(default_factory=dict)         # format -> the onnxobq arguments
    spread: float | None = None        # largest |fake - qdq| over the output's range, where both ran

    def line(self, problem: str) -> str:
        """One problem as the one line that the script prints: the case, its settings, the problem."""
        return f"seed={self.seed} index={self.index} settings={describe(self.settings)}: {problem}"


def describe(settings: dict) -> str:
    """The settings as one line, with calibration arrays shown by shape."""
    def short(v):                                       # arrays by shape, inside dicts too
        if isinstance(v, np.ndarray):
            return f"array{v.shape}"
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items()}
        return v
    return json.dumps({k: short(v) for k, v in settings.items()}, default=str)


def cli_args(settings: dict, model: str, output: str, workdir: str) -> list[str]:
    """The ``onnxobq quantize`` arguments for ``settings`` (calibration arrays saved to files)."""
    args = ["quantize", model, "-o", output]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if key == "calibration":
            args += ["--calib", _calibration_file(value, workdir)]
        elif key == "input_shapes":
            args += [a for name, dims in value.items() for a in ("--input-shape", f"{name}={_dims(dims)}")]
        elif key in ("layer_bits", "layer_group_size"):
            args += [a for glob, n in value for a in (flag, f"{glob}={n}")]
        elif key == "op_types":
            args += [flag, ",".join(value)]
        elif key in ("exclude", "act_exclude"):
            args += [a for glob in value for a in (flag, glob)]
        elif key == "symmetric":
            args += [] if value else ["--asymmetric"]
        elif key in ("bn_reestimate", "bn_fold", "bn_correct"):
            args += [flag if value else "--no-" + flag[2:]]
        elif key == "narrow_range":
            args += [flag] if value else []
        elif key == "bn_samples":
            args += [flag, "all" if value is None else str(value)]
        else:
            args += [flag, str(value)]
    return args


def _dims(dims) -> str:
    """A shape as --input-shape spells it: 1x3x8x8."""
    return "x".join(str(d) for d in dims)


def _calibration_file(value, workdir: str) -> str:
    """Where the command line reads ``value`` from: "random" as it is, arrays saved once as
    calib.npy (one array) or calib.npz (keyed by input name)."""
    if isinstance(value, str):
        return value
    path = os.path.join(workdir, "calib.npy" if isinstance(value, np.ndarray) else "calib.npz")
    if not os.path.exists(path):
        np.save(path, value) if isinstance(value, np.ndarray) else np.savez(path, **value)
    return path


def run_in_process(argv: list[str]) -> Run:
    """``onnxobq.cli.main(argv)`` with stdout, stderr and warnings captured; an exception that
    escapes is a traceback (the command line must turn every user error into exit status 2)."""
    from onnxobq.cli import main
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        try:
            code, trace = main(argv), ""
        except BaseException as e:                          # noqa: BLE001 - the bug we look for
            if isinstance(e, KeyboardInterrupt):
                raise
            code, trace = None, traceback.format_exc()
    seen = _warnings(caught)
    return Run(code, out.getvalue(), err.getvalue(), trace, seen)


def _warnings(caught: list) -> list[str]:
    """Distinct warnings with where they were raised (numerical ones in onnxobq hint at trouble)."""
    where = lambda w: re.sub(r".*/(onnxobq|site-packages)/", r"\1/", w.filename) + f":{w.lineno}"  # noqa: E731
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]} ({where(w)})" for w in caught})


def run_api(settings: dict, model: str, output: str) -> Run:
    """``onnxobq.quantize(model, output, **settings)``, calibration arrays in memory: a
    UserError is exit status 2 with its message on stderr, any other exception a traceback."""
    import onnxobq
    code, err, trace = 0, "", ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            onnxobq.quantize(model, output, **settings)
        except onnxobq.UserError as e:
            code, err = 2, f"onnxobq: error: {e}"
        except Exception:                                   # noqa: BLE001 - the bug we look for
            code, trace = None, traceback.format_exc()
    seen = _warnings(caught)
    return Run(code, "", err, trace, seen)


def run_subprocess(argv: list[str], timeout: float = 300) -> Run:
    """``python -m onnxobq ...`` in a child process, as a user runs it."""
    done = sp.run([sys.executable, "-m", "onnxobq", *argv], capture_output=True, text=True, timeout=timeout)
    trace = done.stderr if "Traceback (most recent call last)" in done.stderr else ""
    return Run(done.returncode, done.stdout, done.stderr, trace)


def judge_exit(run: Run, output: str) -> list[str]:
    """Problems with how a run ended: only 0, or 2 with one error line and no output file."""
    if run.trace:
        return [f"traceback: {_where(run.trace)}"]
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    if "Traceback" in run.err:
        return ["traceback on stderr: " + lines[-1].strip()]
    if run.code == 0:
        return [] if os.path.exists(output) else ["exit 0 but no output file"]
    if run.code != 2:
        return [f"exit {run.code}: {lines[-1] if lines else '(no stderr)'}"]
    problems = []
    if len(lines) != 1 or not lines[0].startswith("onnxobq: error: "):
        problems.append(f"exit 2 with {len(lines)} stderr lines, the first: {lines[0] if lines else ''}")
    if os.path.exists(output):
        problems.append("exit 2 left an output file behind")
    return problems


def _where(trace: str) -> str:
    """A traceback's last line and the innermost onnxobq frame it passed through."""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    frames = re.findall(r'File "[^"]*?(onnxobq/[^"]+)", line (\d+), in (\w+)', trace)
    where = f" (at {frames[-1][0]}:{frames[-1][1]} in {frames[-1][2]})" if frames else ""
    return lines[-1] + where


def session(path: str, optimized: bool) -> ort.InferenceSession:
    """A default session (all of onnxruntime's optimizations), or one with them all off."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def judge_output(path: str, names: list, x: dict, ref: list) -> tuple[list[str], list | None]:
    """Problems with a written model: onnx's full check, a default session, the float model's
    output shapes, and finite outputs where the float model's are finite. Also returns its
    outputs with optimizations off, for the fake/qdq comparison (None where it did not run)."""
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:                                  # noqa: BLE001
        return [f"onnx.checker: {_first_line(e)}"], None
    problems, plain = [], None
    for optimized in (True, False):
        what = "default session" if optimized else "session without optimizations"
        try:
            ys = session(path, optimized).run(names, x)
        except Exception as e:                              # noqa: BLE001
            problems.append(f"{what}: {_first_line(e)}")
            continue
        for name, y, r in zip(names, ys, ref):
            if y.shape != r.shape:
                problems.append(f"{what}: output {name} has shape {y.shape}, the float model {r.shape}")
            elif not np.isfinite(y[np.isfinite(r)]).all():
                problems.append(f"{what}: output {name} is non-finite where the float model's is finite")
        plain = ys if not optimized else plain
    return problems, plain


def agree(fake: list, qdq: list, ref: list, act_bits: bool) -> list[str]:
    """Problems where the fake and qdq outputs differ by more than AGREE_RTOL of the output's
    largest magnitude (with act_bits: on more than AGREE_FLIP_SHARE of the elements)."""
    problems = []
    for i, (a, b, r) in enumerate(zip(fake, qdq, ref)):
        if a.shape != b.shape:
            problems.append(f"fake/qdq output {i}: shapes {a.shape} and {b.shape}")
            continue
        both = np.isfinite(a) & np.isfinite(b)
        if (np.isfinite(a) != np.isfinite(b)).any():
            problems.append(f"fake/qdq output {i}: finite in one format and not the other")
        scale = max(float(np.abs(r[np.isfinite(r)]).max(initial=0)), float(np.abs(a[both]).max(initial=0)))
        off = np.abs(a - b)[both] > AGREE_RTOL * scale + 1e-30
        if off.size and off.mean() > (AGREE_FLIP_SHARE if act_bits else 0):
            d = float(np.abs(a - b)[both].max())
            problems.append(f"fake/qdq output {i}: max |fake - qdq| = {d:.3g}, {d / (scale or 1):.3g} of its "
                            f"range, on {off.sum()} of {off.size} elements")
    return problems


def _first_line(e: BaseException) -> str:
    """An exception as one short line."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def check_case(seed: int, index: int, workdir: str, subprocess: bool = False) -> CaseResult:
    """Draw model ``index`` of ``seed`` and its settings, quantize it as fake and as qdq, and
    judge both (see the module's docstring). Files go to ``workdir``."""
    rng = np.random.default_rng([seed, index])
    model = random_model(rng)
    settings = random_settings(rng, model)
    quiet = ["-q"] if rng.random() < 0.7 else []
    result = CaseResult(seed, index, settings)
    path = os.path.join(workdir, "model.onnx")
    onnx.save(model, path)
    x = feeds(model, np.random.default_rng([seed, index, 1]))
    names = [o.name for o in model.graph.output]
    ref = session(path, True).run(names, x)
    hessians = os.path.join(workdir, "hessians.npz")
    reuse = rng.random() < 0.2                 # the second run solves from the first's Hessians
    via_api = rng.random() < 0.25              # the second run calls onnxobq.quantize, data in memory
    plain = {}
    first = settings["format"]
    for fmt in (first, "qdq" if first == "fake" else "fake"):
        output = os.path.join(workdir, f"out.{fmt}.onnx")
        given = {**settings, "format": fmt}
        if reuse:
            given["save_hessians" if fmt == first else "hessians"] = hessians
        argv = cli_args(given, path, output, workdir) + quiet
        result.argv[fmt] = argv
        how = ("subprocess" if subprocess else "cli") if fmt == first else ("api" if via_api else "cli")
        run = {"subprocess": lambda: run_subprocess(argv), "cli": lambda: run_in_process(argv),
               "api": lambda: run_api(given, path, output)}[how]()
        result.codes[fmt] = run.code
        found = judge_exit(run, output)
        if run.code == 2 and not found:
            result.notes.append(f"{fmt} via {how} refused: {run.err.strip()}")
        result.notes += [f"{fmt} via {how} warning: {w}" for w in run.warnings]
        if run.code == 0 and not found:
            found, plain[fmt] = judge_output(output, names, x, ref)
        result.problems += [f"{fmt} via {how}: {p}" for p in found]
    if plain.get("fake") is not None and plain.get("qdq") is not None:
        result.problems += agree(plain["fake"], plain["qdq"], ref, "act_bits" in settings)
        result.spread = max((_relative(a, b, r) for a, b, r in zip(plain["fake"], plain["qdq"], ref)), default=0.0)
        result.notes += _accuracy_note(settings, plain["qdq"], ref)
    return result


def _relative(a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> float:
    """max |a - b| over max |ref|, where all three are finite."""
    ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(ref)
    return float(np.abs(a - b)[ok].max(initial=0) / max(np.abs(ref[ok]).max(initial=0), 1e-30))


def _accuracy_note(settings: dict, quant: list, ref: list) -> list[str]:
    """A note (not a failure: the data is random) where 8-bit weights alone move an output by
    more than 10% of its norm (SQNR under 20 dB)."""
    if settings["bits"] != 8 or {"act_bits", "layer_bits"} & settings.keys():
        return []
    notes = []
    for i, (q, r) in enumerate(zip(quant, ref)):
        noise = float(np.sum((q.astype(np.float64) - r) ** 2))
        signal = float(np.sum(r.astype(np.float64) ** 2))
        if signal > 0 and noise > 0.01 * signal:
            notes.append(f"accuracy: 8-bit output {i} has SQNR {10 * np.log10(signal / noise):.1f} dB")
    return notes
