"""Which layers are quantized, and how: exclude, op_types, layer_bits, layer_group_size, act_exclude.

Every glob matches a layer's node name, its weight's name, or the name of another node that
shares the weight (``onnxobq inspect`` lists them all). NumPy and the config only.
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import replace

from .config import QuantizeConfig
from .errors import UserError, option
from .quant import GridSpec
from .types import Layer, LayerScan, Skipped

EXCLUDED = "excluded by"           # the reason given for a layer that exclude leaves in float ...
OTHER_OP = "not in"                # ... and for one whose op op_types leaves out


def exclude(scan: LayerScan, patterns: tuple[str, ...], op_types: tuple[str, ...] = ()) -> LayerScan:
    """Move layers whose name or weight matches a glob in ``patterns``, or whose op is not in
    ``op_types`` (when given), to the skipped list."""
    if not patterns and not op_types:
        return scan
    keep = LayerScan(skipped=list(scan.skipped), weights={}, constants=scan.constants)
    for layer in scan.layers:
        hit = next((p for p in patterns if matches(layer, p)), None)
        if op_types and layer.op not in op_types:
            keep.skipped.append(Skipped(layer.name, layer.op, layer.weight,
                                        f"{OTHER_OP} {option('op_types', ','.join(op_types))}"))
        elif hit:
            keep.skipped.append(Skipped(layer.name, layer.op, layer.weight, f"{EXCLUDED} {option('exclude', hit)}"))
        else:
            keep.layers.append(layer)
            keep.weights[layer.name] = scan.weights[layer.name]
    return keep


def unmatched(scan: LayerScan, patterns) -> list[str]:
    """The patterns that match no layer name or weight of ``scan`` (a typo, most likely),
    skipped layers included."""
    return [p for p in patterns if not any(matches(item, p) for item in [*scan.layers, *scan.skipped])]


def matches(item, pattern: str) -> bool:
    """Whether a Layer's or Skipped's name or weight, or the name of another node sharing a
    Layer's weight, matches a glob."""
    names = (item.name, item.weight, *(use[0] for use in getattr(item, "uses", ())))
    return any(n and fnmatch.fnmatchcase(n, pattern) for n in names)


def layer_grid(layer: Layer, cfg: QuantizeConfig) -> GridSpec:
    """The layer's grid: the bit width of the first layer_bits glob matching it (else bits), and
    the group size of the first layer_group_size glob (else group_size); a group of every input
    is the per-channel grid, stored as such."""
    bits = next((b for glob, b in cfg.layer_bits if matches(layer, glob)), cfg.solve.grid.bits)
    group = next((g for glob, g in cfg.layer_group_size if matches(layer, glob)), cfg.solve.grid.group_size)
    if group >= layer.cols:
        group = 0
    return replace(cfg.solve.grid, bits=bits, group_size=group)


def grouping_option(cfg: QuantizeConfig, layers: list[Layer]) -> str:
    """The option that gives one of ``layers`` a scale per group of inputs ("" if none): only then
    does QDQ need opset 21."""
    grouped = [layer for layer in layers if layer_grid(layer, cfg).group_size]
    if not grouped:
        return ""
    from_default = any(not any(matches(layer, g) for g, _ in cfg.layer_group_size) for layer in grouped)
    return option("group_size") if from_default else option("layer_group_size")


def float_inputs(cfg: QuantizeConfig, layers: list[Layer]) -> frozenset:
    """The nodes (one per use of a weight) whose inputs act_exclude keeps in float."""
    return frozenset(use.name for layer in layers for use in layer.each_use()
                     if any(matches(use, p) for p in cfg.act_exclude))


def unmatched_notes(cfg: QuantizeConfig, found: LayerScan, scan: LayerScan) -> list[str]:
    """Notes for the exclude, layer_bits, layer_group_size and act_exclude patterns that match no
    layer, and for the per-layer settings that match only layers left in float."""
    per_layer = (("layer_bits", [g for g, _ in cfg.layer_bits]),
                 ("layer_group_size", [g for g, _ in cfg.layer_group_size]), ("act_exclude", cfg.act_exclude))
    none = [f"{option(name, p)} matched no layer (onnxobq inspect lists their names)"
            for name, patterns in (("exclude", cfg.exclude), *per_layer) for p in unmatched(found, patterns)]
    idle = [f"{option(name, p)} matched only layers left in float"
            for name, patterns in per_layer for p in patterns
            if p not in unmatched(found, [p]) and not any(matches(layer, p) for layer in scan.layers)]
    return none + idle


def check_blocked_matmuls(cfg: QuantizeConfig, layers: list[Layer], model_name: str) -> None:
    """Refuse QDQ MatMuls with a scale per group of inputs whose inputs act_bits quantizes:
    onnxruntime 1.20 to 1.32 fuse them into MatMulIntegerToFloat, which fails on blocked scales
    when the model runs (the Conv and Gemm it leaves alone run)."""
    if cfg.format != "qdq" or cfg.act_bits is None:
        return
    kept = float_inputs(cfg, layers)
    hit = [layer.name for layer in layers if layer.op == "MatMul" and layer_grid(layer, cfg).group_size
           and any(use.name not in kept for use in layer.each_use())]
    if hit:
        shown = ", ".join(hit[:3]) + (f" and {len(hit) - 3} more" if len(hit) > 3 else "")
        raise UserError(f"{model_name}: {grouping_option(cfg, layers)} with {option('act_bits', cfg.act_bits)} on "
                        f"MatMul {shown}: onnxruntime cannot run a MatMul whose weights have a scale per group of "
                        f"inputs behind quantized inputs (its MatMulIntegerToFloat fails); keep their inputs in "
                        f"float with {option('act_exclude')}, give them a scale per channel with "
                        f"{option('layer_group_size', 'GLOB=0')}, or use {option('format', 'fake')}")


def check_layers(cfg: QuantizeConfig, scan: LayerScan, model_name: str) -> None:
    """Refuse a run that would quantize no layer, saying why each was left out."""
    if scan.layers:
        return
    other = Counter(s.op for s in scan.skipped if s.reason.startswith(OTHER_OP))
    excluded = sum(s.reason.startswith(EXCLUDED) for s in scan.skipped)
    ops = option("op_types", ",".join(cfg.op_types))
    if other and not excluded:
        found = ", ".join(f"{n} {op}" for op, n in sorted(other.items()))
        raise UserError(f"{model_name}: no layer of {ops} to quantize (it has {found}); give {option('op_types')} "
                        "with an op the model has")
    named = [s for s in scan.skipped if not s.reason.startswith(OTHER_OP)][:3]
    reasons = "; ".join([f"{s.name}: {s.reason}" for s in named]
                        + ([f"{sum(other.values())} {OTHER_OP} {ops}"] if other else []))
    fix = (f"; give {option('exclude')} patterns{' and ' + option('op_types') if other else ''} that leave some "
           "layers" if excluded else "; onnxobq quantizes layers with a constant float weight, and this model has none")
    raise UserError(f"{model_name}: no quantizable Conv, Gemm or MatMul layer" + (f" ({reasons})" if reasons else "")
                    + (f", {excluded} {EXCLUDED} {option('exclude')}" if excluded else "") + fix)
