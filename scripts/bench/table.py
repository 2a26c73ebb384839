#!/usr/bin/env python
"""Markdown tables from the harness's JSON records.

One section per case: a table of the primary metric (rows = methods, columns = bits x
BN, a FP32 row, a column with the mean quantization time and, in brackets, the mean
time of its solve stage), then the output agreement
with FP32 (SQNR dB / cosine / top-1 of the first output) in the same layout. A cell
that was not measured says why: ``skipped (...)``, ``failed (...)``, ``timeout (...)``
or ``not run``.

Usage::

    python scripts/bench/table.py bench_out/grid              # prints the tables
    python scripts/bench/table.py bench_out/grid -o bench_out/grid/table.md
    python scripts/bench/table.py bench_out/grid --headline 4,3      # one table across the cases
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import METHODS, SCHEMA  # noqa: E402


def load_records(folder: Path) -> list[dict]:
    """Every harness record (``fp32.json`` and run files) under ``folder``, in path order."""
    records = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("schema") == SCHEMA:
            records.append(record)
    return records


def columns(runs: list[dict]) -> list[tuple[int, bool]]:
    """(bits, bn) pairs present, bits descending, BN on before off."""
    return sorted({(r["bits"], r["bn"]) for r in runs}, key=lambda c: (-c[0], not c[1]))


def _rows(runs: list[dict]) -> list[str]:
    labels = {r["label"] for r in runs}
    return [m for m in METHODS if m in labels] + sorted(labels - set(METHODS))


def fmt_metric(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 0.1 else f"{value:.3f}"


def fmt_agreement(record: dict) -> str:
    if not record.get("agreement"):
        return "-"
    a = record["agreement"][0]
    parts = [f"{a['sqnr_db']:.1f}", "-" if a["cosine"] is None else f"{a['cosine']:.4f}"]
    if a.get("top1_agreement") is not None:
        parts.append(f"{a['top1_agreement']:.3f}")
    return " / ".join(parts)


def fmt_time(runs: list[dict]) -> str:
    """Mean wall time of ``onnxobq quantize`` over a row's measured runs, with the mean time of its
    solve stage (the rest is loading, Hessian capture, BN re-estimation and export)."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return "-"
    wall = sum(r["quant_seconds"] for r in ok) / len(ok)
    solve = sum(r["stages_seconds"].get("solve", 0.0) for r in ok) / len(ok)
    return f"{wall:.1f} ({solve:.1f})"


def layer_error_ratio(record: dict) -> float | None:
    """Geometric mean over the layers of error / RTN error, from the run's ``--report``
    (both ||WX-QX||^2/||WX||^2 on the calibration Hessian); below 1 beats rounding."""
    ratios = [l["error"] / l["rtn_error"] for l in record.get("layers") or []
              if l.get("error") is not None and l.get("rtn_error")]
    ratios = [r for r in ratios if r > 0]
    if not ratios:
        return None
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def fmt_ratio(record: dict) -> str:
    value = layer_error_ratio(record)
    return "-" if value is None else f"{value:.3f}"


def cell(record: dict | None, value) -> str:
    """A table cell: the value of an ``ok`` record, else why there is none."""
    if record is None:
        return "not run"
    if record["status"] != "ok":
        return f"{record['status']} ({record.get('short_reason') or record.get('reason')})"
    return value(record)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def case_section(name: str, records: list[dict]) -> list[str]:
    """The Markdown of one case."""
    fp32 = next((r for r in records if r["kind"] == "fp32"), None)
    runs = [r for r in records if r["kind"] == "run"]
    any_record = fp32 or runs[0]
    cols = columns(runs)
    head = ["method"] + [f"W{b} BN {'on' if bn else 'off'}" for b, bn in cols]
    direction = "higher" if any_record["higher_is_better"] else "lower"
    out = [f"## {name}: {any_record['primary']} ({direction} is better)", ""]
    by_key = {(r["label"], r["bits"], r["bn"]): r for r in runs}

    rows = []
    if fp32:
        status = "" if fp32["status"] == "ok" else " (MISMATCH)"
        rows.append([f"**FP32**{status}"] + [fmt_metric(fp32["primary_value"])] * len(cols) + ["-"])
    for label in _rows(runs):
        rows.append([label] + [cell(by_key.get((label, b, bn)), lambda r: fmt_metric(r["primary_value"]))
                               for b, bn in cols] + [fmt_time([r for k, r in by_key.items() if k[0] == label])])
    out += _table(head + ["mean quant s (solve s)"], rows)

    out += ["", "Output agreement with FP32 on the held-out inputs, first output "
                "(SQNR dB / cosine / top-1 agreement where it applies):", ""]
    rows = [[label] + [cell(by_key.get((label, b, bn)), fmt_agreement) for b, bn in cols]
            for label in _rows(runs)]
    out += _table(head, rows)

    out += ["", "Per-layer error relative to round-to-nearest (geometric mean over the layers of "
                "||WX-QX||^2 / ||WX-Q_rtn X||^2 on the calibration data; the paper's Figure 1 "
                "compares these per layer):", ""]
    rows = [[label] + [cell(by_key.get((label, b, bn)), fmt_ratio) for b, bn in cols]
            for label in _rows(runs) if label != "rtn"]
    out += _table(head, rows)
    out += [""] + settings_lines(any_record, fp32)
    return out


def settings_lines(record: dict, fp32: dict | None) -> list[str]:
    """Seed, size, versions and machine of a case's records."""
    v, m = record["versions"], record["machine"]
    lines = [f"Seed {record['seed']}{', quick' if record['quick'] else ''}; "
             + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "; "
             + f"{m['cpu']}, {m['usable_cores']} of {m['cpu_count']} cores, {m['platform']}."]
    if fp32:
        figures = ", ".join(f"{k} {fmt_metric(val)}" for k, val in fp32["metrics"].items())
        verdict = "matches docs/benchmarks.md" if fp32["status"] == "ok" else "; ".join(fp32["misses"])
        lines.append(f"FP32: {figures} ({verdict}).")
    return lines + [""]


def headline(records: list[dict], bits: tuple[int, ...] = (4, 3), bn: bool = True) -> str:
    """One table across the cases: each case's primary metric at the given bit widths and BN
    setting (rows = methods, a FP32 row first)."""
    cases = list(dict.fromkeys(r["case"] for r in records))
    runs = [r for r in records if r["kind"] == "run" and r["bn"] == bn and r["bits"] in bits]
    by_key = {(r["case"], r["label"], r["bits"]): r for r in runs}
    fp32 = {r["case"]: r for r in records if r["kind"] == "fp32"}
    cols = [(c, b) for c in cases for b in bits]
    first = {c: next(r for r in records if r["case"] == c) for c in cases}
    head = ["method"] + [f"{c} {first[c]['primary']} W{b}" for c, b in cols]
    rows = [["**FP32**"] + [fmt_metric(fp32[c]["primary_value"]) if c in fp32 else "-" for c, _ in cols]]
    for label in _rows(runs):
        rows.append([label] + [cell(by_key.get((c, label, b)), lambda r: fmt_metric(r["primary_value"]))
                               for c, b in cols])
    better = ", ".join(f"{c}: {'higher' if first[c]['higher_is_better'] else 'lower'}" for c in cases)
    return "\n".join(_table(head, rows) + ["", f"BN re-estimation {'on' if bn else 'off'}; better is {better}."])


def markdown(records: list[dict]) -> str:
    """All cases' tables, cases in the order first seen."""
    cases = list(dict.fromkeys(r["case"] for r in records))
    out = ["# onnxobq benchmark", ""]
    for name in cases:
        out += case_section(name, [r for r in records if r["case"] == name])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the harness output folder (searched recursively)")
    p.add_argument("-o", "--output", type=Path, help="write here instead of printing")
    p.add_argument("--headline", metavar="BITS", help="only the table across cases at these bit widths, e.g. 4,3")
    p.add_argument("--bn", choices=("on", "off"), default="on", help="BN setting of --headline (default on)")
    args = p.parse_args(argv)
    records = load_records(args.folder)
    if not records:
        print(f"no harness records under {args.folder}", file=sys.stderr)
        return 1
    if args.headline:
        text = headline(records, tuple(int(b) for b in args.headline.split(",")), args.bn == "on")
    else:
        text = markdown(records)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
