"""The run report: per-layer figures, stage times, memory, as a table and as JSON."""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field

from .errors import option
from .files import write_atomically
from .metrics import sqnr_db
from .types import LayerStats, Skipped


@dataclass
class Report:
    """Everything a run measured and wrote. Built by the pipeline; the command line shows it
    with layer_table and summary_lines; ``to_dict()`` is the JSON report.

    Attributes:
        settings: every setting of the run, resolved (the method's order, the opset written).
        layers: one LayerStats per quantized layer, in graph order; skipped: the layers left in
            float, each with the reason.
        stages: seconds per stage (load, capture, solve, bn, export).
        samples: calibration samples the Hessians came from.
        device: "cpu" or "cuda:NAME".
        storage: how the weights are stored, in words.
        peak_rss_mb, peak_gpu_mb: peak host memory of the process, GPU memory of CuPy's pool.
        bn: the BatchNorm step (enabled, errors before and after, kept, counts, notes).
        outputs: the files written (the model first); none where ``output`` was None.
        capture_waited: seconds the capture waited for onnxruntime's forward passes.
        activations: what act_bits quantized, with the scales.
        notes: about the run as a whole.
        model: the input model's name; model_sha256: its digest.
        calibration: the calibration data and its pre-processing (calibration.describe).
        weights: parameter counts: "quantized", "float" (left in float), and "float_by_op".
        versions: of onnxobq, onnx, onnxruntime and numpy.
        quantized_model: the quantized onnx.ModelProto where ``output`` was None (else None).
    """

    settings: dict
    layers: list[LayerStats]
    skipped: list[Skipped]
    stages: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    device: str = "cpu"
    storage: str = ""
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    bn: dict = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    capture_waited: float | None = None
    activations: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model: str = ""
    model_sha256: str = ""
    calibration: dict | None = None
    weights: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    quantized_model: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """A JSON-ready dict (without the quantized model itself)."""
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "settings": self.settings,
            "calibration": self.calibration,
            "device": self.device,
            "calibration_samples": self.samples,
            "storage": self.storage,
            "weights": self.weights,
            "stages_seconds": {k: round(v, 4) for k, v in self.stages.items()},
            "total_seconds": round(sum(self.stages.values()), 4),
            "capture_waited_seconds": None if self.capture_waited is None else round(self.capture_waited, 4),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_gpu_mb": None if self.peak_gpu_mb is None else round(self.peak_gpu_mb, 1),
            "bn": self.bn,
            "activations": self.activations,
            "outputs": self.outputs,
            "notes": self.notes,
            "layers": [asdict(s) for s in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "versions": self.versions,
            "platform": {"python": platform.python_version(), "machine": platform.machine()},
        }


def versions() -> dict:
    """The versions of onnxobq and the libraries that shape its output."""
    from importlib import metadata

    found = {}
    for name in ("onnxobq", "onnx", "onnxruntime", "numpy", "onnx-graphsurgeon"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_json(report: Report, path: str) -> None:
    """Write the report atomically."""
    write_atomically(path, lambda f: json.dump(report.to_dict(), f, indent=2))


def _fmt_err(e: float | None) -> str:
    return "-" if e is None else f"{e:.3e}"


def layer_table(report: Report) -> str:
    """The per-layer table: error relative to ||WX||^2 for the method and for plain rounding."""
    rows = [("layer", "op", "weight", "bits", "method", "error", "rtn error", "seconds")]
    for s in report.layers:
        rows.append((s.name, s.op + (f"/g{s.groups}" if s.groups > 1 else ""),
                     "x".join(map(str, s.shape)), str(s.bits), s.method,
                     _fmt_err(s.error), _fmt_err(s.rtn_error), f"{s.seconds:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# Layers that share a note are listed on one line from this many on (a NaN in the data
# reaches every layer after it: 54 lines of the same note said less than one).
GROUPED_NOTES = 3


def _names(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _note_lines(layers) -> list[str]:
    """One line per layer note, or one for all the layers that share a note."""
    by_note: dict[str, list[str]] = {}
    for s in layers:
        if s.note:
            by_note.setdefault(s.note, []).append(s.name)
    out = []
    for note, names in by_note.items():
        if len(names) >= GROUPED_NOTES:
            out.append(f"note: {len(names)} layers ({_names(names)}), each: {note}")
        else:
            out.extend(f"note: {name}: {note}" for name in names)
    return out


def weights_line(weights: dict, shown: int = 5) -> str:
    """The parameters quantized and those left in float, with the ops that read the latter."""
    total = weights["quantized"] + weights["float"]
    share = f" ({100 * weights['float'] / total:.1f}%)" if total else ""
    ops = list(weights["float_by_op"].items())
    named = ", ".join(f"{op} {n:,}" for op, n in ops[:shown]) + (f" and {len(ops) - shown} more ops" if len(ops) > shown
                                                                  else "")
    return (f"parameters: {weights['quantized']:,} quantized, {weights['float']:,} left in float{share}"
            + (f": {named}" if named else ""))


def summary_lines(report: Report) -> list[str]:
    """A few lines after the table: totals, BN, times, memory, outputs."""
    errs = [s.error for s in report.layers if s.error is not None]
    rtn = [s.rtn_error for s in report.layers if s.rtn_error is not None]
    captured = f"{report.samples} calibration samples" if report.samples else "no Hessians captured"
    out = [f"quantized {len(report.layers)} layer{'s' * (len(report.layers) != 1)}, left {len(report.skipped)} in float; "
           f"{captured}; device {report.device}"]
    if report.weights:
        out.append(weights_line(report.weights))
    if errs:
        out.append(f"mean layer error {sum(errs) / len(errs):.3e} (round-to-nearest: {sum(rtn) / len(rtn):.3e})")
    out.extend(f"note: {note}" for note in report.notes)
    out.extend(_note_lines(report.layers))
    thin = [s for s in report.layers if s.rank_deficient]
    if thin:
        names = _names([f"{s.name} ({s.rows} rows, {s.cols} inputs)" for s in thin])
        count = f"{len(thin)} layer{'s' if len(thin) > 1 else ''} saw"
        out.append(f"note: {count} fewer rows of calibration input than they have inputs: "
                   f"{names}. Their Hessians are rank-deficient, so their errors above are optimistic "
                   "and may not carry over to other data; give more calibration samples")
    stacked = [s for s in report.layers if s.stacked > 1]
    if stacked:
        out.append(f"note: {len(stacked)} layers were solved in stacks with others of the same shape; "
                   "their seconds are shares of their stack's time")
    by_reason: dict[str, list] = {}
    for k in report.skipped:
        by_reason.setdefault(k.reason, []).append(k)
    for reason, skipped in by_reason.items():
        if len(skipped) > 3:     # --op-types, say: one line for the lot (the JSON report lists each)
            out.append(f"skipped: {len(skipped)} layers ({', '.join(sorted({k.op for k in skipped}))}): {reason}")
            continue
        out.extend(f"skipped: {k.name} ({k.op}): {k.reason}" for k in skipped)
    out.extend(bn_lines(report.bn, report.samples))
    act = report.activations
    if act.get("enabled"):
        n, t, kept = act["layer_inputs"], act["tensors"], act.get("excluded", [])
        float_note = (f"; {len(kept)} layer input{'s' * (len(kept) != 1)} kept in float by {option('act_exclude')}"
                      if kept else "")
        out.append(f"activations: INT{act['bits']} QuantizeLinear/DequantizeLinear on {n} layer input{'s' * (n != 1)} "
                   f"({t} tensor{'s' * (t != 1)}), one scale per tensor ({act['calibration']} calibration "
                   f"over the {report.samples} calibration samples){float_note}")
    out.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.stages.items()) +
               f"; total {sum(report.stages.values()):.2f}s" +
               ("" if report.capture_waited is None else
                f" (the capture waited {report.capture_waited:.2f}s for onnxruntime's forward passes)"))
    mem = f"peak memory: {report.peak_rss_mb:.0f} MB host"
    if report.peak_gpu_mb is not None:
        mem += f", {report.peak_gpu_mb:.0f} MB GPU"
    out.append(mem)
    out.append("wrote " + ", ".join(report.outputs) + (f" ({report.storage})" if report.storage else ""))
    return out


def _on_samples(n: int | None, total: int) -> str:
    if not n:
        return ""
    if n < total:
        return f" on {n} of the {total} samples ({option('bn_samples')})"
    return f" on {n} samples"


def bn_lines(bn: dict, calibration_samples: int = 0) -> list[str]:
    """The BatchNorm step in words: what it changed (on how many of the ``calibration_samples``),
    the output error before and after, the verdict."""
    if not bn.get("enabled"):
        return ["BN re-estimation: off"]
    lines = []
    before, after = bn.get("error_before"), bn.get("error_after")
    if before is not None:
        change = (f"output error {before:.3e} -> {after:.3e} "
                  f"(SQNR {sqnr_db(before):.1f} -> {sqnr_db(after):.1f} dB)")
        work = (f"{bn['reestimated']} BN nodes re-estimated, {bn['folded']} folded, "
                f"{bn['corrected']} Convs corrected" + _on_samples(bn.get("samples"), calibration_samples))
        if bn["kept"]:
            lines.append(f"BN re-estimation: {work}; {change}: kept")
        else:
            why = "it rose" if after >= before else "it fell by less than 1%"
            lines.append(f"BN re-estimation: reverted ({why}), the model keeps its original BN statistics "
                         f"and weights; {change} with {work}")
    lines.extend(f"BN: {note}" for note in bn.get("notes", []))
    return lines
