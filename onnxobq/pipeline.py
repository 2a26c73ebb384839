"""The whole run, top down: load -> capture -> solve -> BN -> export -> report."""
from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, replace

from .backend import array_module, device_name, is_cupy
from .bn import BNOutcome, reestimate
from .capture import Captured, capture_hessians
from .calibration import Replay, planned_samples, source_kind
from .config import QuantizeConfig
from .errors import UserError
from .export import build_model, model_opset, prepare_opset, storage_type
from .hessians import load as load_hessians, save as save_hessians
from .graph import check_output_path, load_model, save_model, scan_folded, stored_externally
from .graph.layers import QUANTIZABLE_OPS, LayerScan, Skipped
from .report import RunReport, layer_table, peak_rss_mb, summary_lines, write_json  # noqa: F401
from .quant.activations import activation_scales
from .solve import plan_stacks, solve_stack, stack_budget, working_dtype
from .solvers import METHODS
from .threads import LayerWorkers, cpu_workers


class Progress:
    """Callbacks for progress bars; the default shows nothing."""

    def start(self, what: str, total: int | None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...


def run(cfg: QuantizeConfig, progress: Progress | None = None) -> RunReport:
    """Quantize ``cfg.model`` into ``cfg.output`` and return the report."""
    progress = progress or Progress()
    stages: dict[str, float] = {}
    with _stage(stages, "load"):
        check_output_path(cfg.model, cfg.output)
        model = load_model(cfg.model)
        model, found, fold_notes = scan_folded(prepare_opset(model, cfg.format, cfg.opset,
                                                             activations=cfg.act_bits is not None,
                                                             grouped=_grouping_option(cfg, model)))
        external = stored_externally(cfg.model)
        scan = exclude(found, cfg.exclude, cfg.op_types)
        _check_inputs(cfg, scan)
        xp = array_module(cfg.device)
    captured = Captured({}, {}, 0)
    # BatchNorm's four passes replay the batches that the first pass read, where they fit
    calib = Replay(cfg.calib) if cfg.calib is not None and cfg.bn.reestimate else cfg.calib
    if cfg.hessians is not None:
        with _stage(stages, "load_hessians"):
            captured = load_hessians(cfg.hessians, scan.layers, cfg.model, cfg.calib, xp)
    elif cfg.calib is not None:
        with _stage(stages, "capture"):
            progress.start("calibration", _planned(cfg, model))
            captured = capture_hessians(model, scan.layers, calib, xp, cfg.device, progress.advance,
                                        sum_dtype=xp.dtype(working_dtype(cfg.solve.precision, xp)).name,
                                        ranges=cfg.act_bits is not None)
            progress.finish()
    if cfg.save_hessians is not None:
        with _stage(stages, "save_hessians"):
            save_hessians(cfg.save_hessians, captured, scan.layers, cfg.model, cfg.calib)
    uses = [use for layer in scan.layers for use in layer.each_use()]     # one per node: --act-exclude names nodes
    act_skip = frozenset(u.name for u in uses if any(_matches(u, p) for p in cfg.act_exclude))
    act_layers = [use for use in uses if use.name not in act_skip]        # the nodes whose inputs get pairs
    act_scales, act_notes = _activation_scales(cfg, act_layers, captured)
    with _stage(stages, "solve"):
        qlayers, stats = solve_all(scan, captured, cfg, xp, progress)
    samples = captured.samples
    opset, symmetric = model_opset(model), cfg.solve.grid.symmetric
    outcome = BNOutcome(qlayers=qlayers)
    if cfg.bn.reestimate and cfg.calib is not None:
        with _stage(stages, "bn"):
            progress.start("batchnorm", None)
            outcome = reestimate(model, qlayers, cfg.bn, calib, opset, symmetric, cfg.device,
                                 progress.advance)
            progress.finish()
    if outcome.kept:
        qlayers, edits = outcome.qlayers, outcome.edits
    else:
        edits = ()
    with _stage(stages, "export"):
        out = build_model(model, qlayers, cfg.format, opset, symmetric, edits, act_scales, act_skip)
        written = save_model(out, cfg.output, external=True if external else None)
    report = RunReport(settings=_settings(cfg, opset), layers=stats, skipped=scan.skipped,
                       stages=stages, samples=samples, device=device_name(xp),
                       storage=_storage(cfg, opset, [q.bits for q in qlayers], [q.group_size for q in qlayers]),
                       peak_rss_mb=peak_rss_mb(), peak_gpu_mb=_gpu_peak(xp),
                       bn=_bn_summary(outcome, cfg), outputs=written, capture_waited=captured.waited,
                       activations=_activation_summary(cfg, act_layers, act_scales, sorted(act_skip)),
                       notes=fold_notes + act_notes + _unmatched_notes(cfg, found, scan))
    if cfg.report:
        try:
            write_json(report, cfg.report)
        except UserError:       # a failed run leaves no output behind
            for path in written:
                os.unlink(path)
            raise
    return report


def _unmatched_notes(cfg: QuantizeConfig, found: LayerScan, scan: LayerScan) -> list[str]:
    """Notes for the --exclude, --layer-bits and --layer-group-size patterns that match no
    layer, and for the per-layer settings that match only layers left in float."""
    per_layer = (("--layer-bits", [g for g, _ in cfg.layer_bits]),
                 ("--layer-group-size", [g for g, _ in cfg.layer_group_size]), ("--act-exclude", cfg.act_exclude))
    none = [f"{option} {p} matched no layer (onnxobq inspect lists their names)"
            for option, patterns in (("--exclude", cfg.exclude), *per_layer) for p in unmatched(found, patterns)]
    idle = [f"{option} {p} matched only layers left in float"
            for option, patterns in per_layer for p in patterns
            if p not in unmatched(found, [p]) and not any(_matches(layer, p) for layer in scan.layers)]
    return none + idle


def _activation_scales(cfg: QuantizeConfig, layers: list, captured: Captured) -> tuple[dict, list[str]]:
    """The INT8 scales of the inputs of ``layers`` (--act-bits) from the captured ranges, and notes."""
    if cfg.act_bits is None:
        return {}, []
    needed = list(dict.fromkeys(use.input for layer in layers for use in layer.each_use()))
    if set(needed) - set(captured.ranges):     # a --hessians file saved without --act-bits
        raise UserError(f"--hessians {cfg.hessians}: saved without the activation ranges that --act-bits "
                        "needs; capture them again with --act-bits and --save-hessians")
    return activation_scales({name: captured.ranges[name] for name in needed}, cfg.act_bits, cfg.act_calib)


def _activation_summary(cfg: QuantizeConfig, layers: list, scales: dict, excluded: list) -> dict:
    if cfg.act_bits is None:
        return {"enabled": False}
    inputs = sum(use.input in scales for layer in layers for use in layer.each_use())
    return {"enabled": True, "bits": cfg.act_bits, "calibration": cfg.act_calib, "layer_inputs": inputs,
            "tensors": len(scales), "scales": scales, "excluded": excluded}


def solve_all(scan: LayerScan, captured: Captured, cfg: QuantizeConfig, xp, progress: Progress):
    """Solve every layer, on a GPU same-shaped small layers as one stack (solve.plan_stacks); free
    each Hessian after its last layer. Returns the results in graph order.

    On NumPy the stacks go to one thread per core, the costliest first, BLAS on one thread each
    (see onnxobq.threads): on the 2-core machine the detector's 83 layers took 2.04 and 2.05 s
    this way against 2.51 and 2.63 s one after another on two BLAS threads, and ResNet-50's 54
    16.8 and 17.8 s against 21.7 and 22.5 s (FastOBQ from saved Hessians, scratch timings)."""
    layers, hessians = scan.layers, captured.hessians
    uses = Counter(layer.hessian_key for layer in layers)
    itemsize = xp.dtype(working_dtype(cfg.solve.precision, xp)).itemsize
    grids = [layer_grid(layer, cfg) for layer in layers]
    plan = plan_stacks(layers, [hessians.get(l.hessian_key) is not None for l in layers], itemsize,
                       stack_budget(xp), grids)
    results = [None] * len(layers)
    lock = threading.Lock()

    def solve(_key, stack, _tools):
        members = [layers[i] for i in stack]
        solve_cfg = replace(cfg.solve, grid=grids[stack[0]])
        solved = solve_stack(members, [scan.weights[l.name] for l in members],
                             [hessians.get(l.hessian_key) for l in members], solve_cfg, xp,
                             [captured.rows.get(l.hessian_key) for l in members])
        with lock:
            for i, result in zip(stack, solved):
                results[i] = result
            for layer in members:
                uses[layer.hessian_key] -= 1
                if uses[layer.hessian_key] == 0:
                    hessians.pop(layer.hessian_key, None)
            progress.advance(len(stack))

    def cost(stack):                            # the factorisations and the sweep, every group
        return sum(layers[i].groups * (layers[i].cols ** 3 + layers[i].rows * layers[i].cols ** 2) for i in stack)

    progress.start("layers", len(layers))
    with LayerWorkers(min(cpu_workers(xp), len(plan))) as workers:
        workers.run([(n, stack, cost(stack)) for n, stack in enumerate(plan)], solve)
    progress.finish()
    return [q for q, _ in results], [s for _, s in results]


def _grouping_option(cfg: QuantizeConfig, model) -> str:
    """The option that gives some layer to be quantized a scale per group of inputs ("" if none):
    only then does QDQ need opset 21 (a scan of the model as loaded decides)."""
    if cfg.format != "qdq" or not cfg.grouped:
        return ""
    _, found, _ = scan_folded(model)
    grouped = [layer for layer in exclude(found, cfg.exclude, cfg.op_types).layers if layer_grid(layer, cfg).group_size]
    if not grouped:
        return ""
    from_default = any(not any(_matches(layer, g) for g, _ in cfg.layer_group_size) for layer in grouped)
    return "--group-size" if from_default else "--layer-group-size"


def layer_grid(layer, cfg: QuantizeConfig):
    """The layer's grid: the bit width of the first --layer-bits glob matching its name or weight
    (else --bits), and the group size of the first --layer-group-size glob (else --group-size)."""
    bits = next((b for glob, b in cfg.layer_bits if _matches(layer, glob)), cfg.solve.grid.bits)
    group = next((g for glob, g in cfg.layer_group_size if _matches(layer, glob)), cfg.solve.grid.group_size)
    if group >= layer.cols:     # one group of every input: the per-channel grid, stored as such
        group = 0
    return replace(cfg.solve.grid, bits=bits, group_size=group)


EXCLUDED = "excluded by --exclude"      # the reason given for a layer that --exclude leaves in float
OTHER_OP = "not in --op-types"          # ... and for one whose op --op-types leaves out


def exclude(scan: LayerScan, patterns: tuple[str, ...], op_types: tuple[str, ...] = ()) -> LayerScan:
    """Move layers whose name or weight matches a glob in ``patterns``, or whose op is not in
    ``op_types`` (when given), to the skipped list."""
    if not patterns and not op_types:
        return scan
    keep = LayerScan(skipped=list(scan.skipped), weights=scan.weights)
    for layer in scan.layers:
        hit = next((p for p in patterns if _matches(layer, p)), None)
        if op_types and layer.op not in op_types:
            keep.skipped.append(Skipped(layer.name, layer.op, layer.weight, f"{OTHER_OP} {','.join(op_types)}"))
        elif hit:
            keep.skipped.append(Skipped(layer.name, layer.op, layer.weight, f"{EXCLUDED} {hit}"))
        else:
            keep.layers.append(layer)
    return keep


def unmatched(scan: LayerScan, patterns: tuple[str, ...]) -> list[str]:
    """The patterns of ``patterns`` that match no layer name or weight of ``scan`` (a typo,
    most likely), skipped layers included."""
    return [p for p in patterns if not any(_matches(item, p) for item in [*scan.layers, *scan.skipped])]


def _matches(item, pattern: str) -> bool:
    """Whether a Layer's or Skipped's name or weight, or the name of another node sharing a
    Layer's weight, matches an --exclude or --layer-bits glob."""
    names = (item.name, item.weight, *(use[0] for use in getattr(item, "uses", ())))
    return any(n and fnmatch.fnmatchcase(n, pattern) for n in names)


def _check_inputs(cfg: QuantizeConfig, scan: LayerScan) -> None:
    if not scan.layers:
        other = Counter(s.op for s in scan.skipped if s.reason.startswith(OTHER_OP))
        excluded = sum(s.reason.startswith(EXCLUDED) for s in scan.skipped)
        if other and not excluded:
            found = ", ".join(f"{n} {op}" for op, n in sorted(other.items()))
            raise UserError(f"{cfg.model}: no layer of --op-types {','.join(cfg.op_types)} to quantize (it has "
                            f"{found}); give --op-types with an op the model has")
        named = [s for s in scan.skipped if not s.reason.startswith(OTHER_OP)][:3]
        reasons = "; ".join([f"{s.name}: {s.reason}" for s in named]
                            + ([f"{sum(other.values())} {OTHER_OP} {','.join(cfg.op_types)}"] if other else []))
        fix = (f"; give --exclude patterns{' and --op-types' if other else ''} that leave some layers" if excluded
               else "; onnxobq quantizes layers with a constant float weight, and this model has none")
        raise UserError(f"{cfg.model}: no quantizable Conv, Gemm or MatMul layer"
                        + (f" ({reasons})" if reasons else "")
                        + (f", {excluded} {EXCLUDED}" if excluded else "") + fix)
    method = METHODS[cfg.solve.method]
    if cfg.save_hessians is not None and cfg.hessians is not None:
        raise UserError(f"--save-hessians {cfg.save_hessians}: the Hessians come from --hessians {cfg.hessians} "
                        "already; give one of the two")
    if cfg.calib is None and cfg.save_hessians is not None:
        raise UserError(f"--save-hessians {cfg.save_hessians}: there are no Hessians to save without "
                        "calibration data; give --calib FOLDER|FILE")
    if cfg.calib is None and cfg.hessians is not None and cfg.bn.reestimate:
        raise UserError(f"--hessians {cfg.hessians}: BatchNorm re-estimation still needs the calibration "
                        "data; give the --calib options the Hessians were saved with, or --no-bn-reestimate")
    if method.uses_hessian and cfg.calib is None and cfg.hessians is None:
        raise UserError(f"--method {cfg.solve.method} needs calibration data: give --calib FOLDER|FILE, "
                        "or --calib random for a smoke run")
    if cfg.act_bits is not None and cfg.calib is None and cfg.hessians is None:
        raise UserError(f"--act-bits {cfg.act_bits} needs calibration data for the activations' ranges: "
                        "give --calib FOLDER|FILE, or --calib random for a smoke run")
    if cfg.calib is not None:
        source_kind(cfg.calib)      # options for another kind of source fail now, not after a --hessians solve


def _planned(cfg: QuantizeConfig, model) -> int | None:
    from .capture import model_inputs
    try:
        return planned_samples(cfg.calib, model_inputs(model))
    except UserError:
        return None  # capture reports it


@contextmanager
def _stage(stages: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = time.perf_counter() - start


def _storage(cfg: QuantizeConfig, opset: int, bits: list[int], groups: list[int]) -> str:
    """How the weights are stored, in words for the summary; with the layer counts where
    --layer-bits gave layers other widths, or --layer-group-size other group sizes."""
    counts = sorted(Counter(bits or [cfg.solve.grid.bits]).items())
    parts, small_in_8 = [], False
    for b, n in counts:
        count = f" ({n} layer{'s' * (n > 1)})" if len(counts) > 1 else ""
        if cfg.format == "fake":
            parts.append(f"float weights on {'an' if b == 8 else 'a'} {b}-bit grid{count}")
            continue
        kind = storage_type(b, cfg.solve.grid.symmetric, opset)
        parts.append(f"{kind} weights holding {b}-bit codes{count}")
        small_in_8 |= b <= 4 and kind.endswith("8")
    which = "them" if len(counts) == 1 else "those of 4 bits and below"
    sizes = Counter(groups)
    if len(sizes) == 1 and 0 not in sizes:
        scales = f", one scale per {groups[0]} inputs"
    elif len(sizes) > 1:       # --layer-group-size (or a layer's few inputs) gave layers other group sizes
        scales = "".join(f", one scale per {f'{g} inputs' if g else 'channel'} in {n} layer{'s' * (n > 1)}"
                         for g, n in sorted(sizes.items(), key=lambda item: (item[0] == 0, item[0])))
    else:
        scales = ""
    return ", ".join(parts) + scales + (f"; --opset 21 stores {which} as 4-bit" if small_in_8 else "")


def _gpu_peak(xp) -> float | None:
    if not is_cupy(xp):
        return None
    return xp.get_default_memory_pool().total_bytes() / 2 ** 20


def _settings(cfg: QuantizeConfig, opset: int) -> dict:
    s = asdict(cfg)
    s["opset"] = opset
    s["op_types"] = list(cfg.op_types or QUANTIZABLE_OPS)
    s["solve"]["order"] = cfg.solve.order or METHODS[cfg.solve.method].default_order
    return s


def _bn_summary(outcome: BNOutcome, cfg: QuantizeConfig) -> dict:
    if not cfg.bn.reestimate or cfg.calib is None:
        return {"enabled": False}
    return {"enabled": True, "mode": cfg.bn.mode, "error_before": outcome.error_before,
            "error_after": outcome.error_after, "kept": outcome.kept, "reestimated": outcome.reestimated,
            "folded": outcome.folded, "corrected": outcome.corrected, "samples": outcome.samples,
            "notes": outcome.notes}


def inspect_model(path: str) -> tuple[LayerScan, list[str]]:
    """Load a model and list its quantizable and skipped layers, as quantize would find them
    (weights that constants compute folded), with the fold's notes."""
    _, scan, notes = scan_folded(load_model(path))
    return scan, notes


def compare(float_path: str, quant_path: str, calib, device: str = "cpu",
            progress: Progress | None = None) -> list[dict]:
    """Per-output SQNR, cosine similarity and top-1 agreement of two models on ``calib``."""
    from .compare import compare_models

    progress = progress or Progress()
    progress.start("compare", None)
    try:
        return compare_models(float_path, quant_path, calib, device, progress.advance)
    finally:
        progress.finish()
