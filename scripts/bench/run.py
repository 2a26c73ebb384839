#!/usr/bin/env python
"""Run the onnxobq benchmark grid on real models (see ``harness.py`` and docs/benchmarks.md).

Examples::

    python scripts/bench/run.py --case ocr_rec --methods rtn,fastobq_sensi_des --bits 4 --bn on
    python scripts/bench/run.py --case ocr_rec --methods all --bits 8,6,4,3 --bn on,off \\
        --seed 0 --out bench_out/grid --plots
    python scripts/bench/run.py --case synthetic --quick --out /tmp/bench_smoke   # harness smoke test
    python scripts/bench/run.py --case ocr_rec --fp32-only                        # only the FP32 check

Methods: rtn, gptq (natural order), gptq_act (act-order), fastobq_{sensi,err,w}_{des,asc},
obq (exact; skipped where it would take more than --obq-max-macs multiply-adds), or all.

Exit status: 0; 1 when a FP32 model does not reproduce docs/benchmarks.md (each missed figure
is printed); 2 for a bad command line or a case that cannot run here; 3 when some run
failed or timed out (its JSON says why; the others are written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import cases  # noqa: E402
from bench.case import CaseUnavailable, FP32Mismatch  # noqa: E402
from bench.harness import (DEFAULT_OBQ_MAX_MACS, METHODS, HarnessConfig, default_cli,  # noqa: E402
                           make_grid, run_case)

EXTRA_CASES = ("synthetic",)


def load_case(name: str):
    """A real case from ``bench.cases``, or the synthetic one."""
    if name in EXTRA_CASES:
        import importlib
        return importlib.import_module(f"bench.cases.{name}").CASE
    return cases.load(name)


def _list(text: str, choices, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items == ["all"]:
        return list(choices)
    bad = [t for t in items if t not in choices]
    if bad or not items:
        raise SystemExit(f"run.py: error: --{what}: {', '.join(bad) or 'nothing given'} not in "
                         f"{', '.join(choices)} (or all)")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("Examples::\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="ocr_rec", help=f"comma-separated cases of {', '.join(cases.NAMES)}, "
                   "synthetic, or all (the real ones); default ocr_rec")
    p.add_argument("--methods", default="all", help="comma-separated grid methods, or all (default)")
    p.add_argument("--bits", default="8,6,4,3", help="comma-separated bit widths (default 8,6,4,3)")
    p.add_argument("--bn", default="on,off", help="BN re-estimation: on, off or on,off (default)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0: the sets of docs/benchmarks.md)")
    p.add_argument("--out", type=Path, default=Path("bench_out/grid"), help="output folder (default bench_out/grid)")
    p.add_argument("--quick", action="store_true", help="the cases' smaller evaluation sets")
    p.add_argument("--fp32-only", action="store_true", help="only check the FP32 figures")
    p.add_argument("--obq-max-macs", type=float, default=DEFAULT_OBQ_MAX_MACS,
                   help=f"skip exact OBQ where it would take more multiply-adds (default {DEFAULT_OBQ_MAX_MACS:.0e})")
    p.add_argument("--timeout", type=float, help="seconds one quantization may take (default: no limit)")
    p.add_argument("--threads", type=int, help="onnxruntime threads of the cases' evaluation (where a case has them)")
    p.add_argument("--keep-models", action="store_true", help="keep the quantized models under OUT/CASE/models")
    p.add_argument("--onnxobq", help="command that runs onnxobq (default: the onnxobq beside this Python)")
    p.add_argument("--quantize-args", default="", help="more onnxobq quantize options for every run, e.g. '--device cpu'")
    p.add_argument("--capture-each", action="store_true",
                   help="capture the Hessians in every run (default: once per case, then reuse them)")
    p.add_argument("--plots", action="store_true", help="also draw the plots (needs matplotlib)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import shlex

    args = parse_args(argv)
    names = _list(args.case, cases.NAMES + EXTRA_CASES, "case") if args.case != "all" else list(cases.NAMES)
    methods = [] if args.fp32_only else _list(args.methods, tuple(METHODS), "methods")
    try:
        bits = [int(b) for b in args.bits.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"run.py: error: --bits {args.bits!r}: give comma-separated integers, e.g. 8,4") from None
    bns = [{"on": True, "off": False}[b] for b in _list(args.bn, ("on", "off"), "bn")]
    cfg = HarnessConfig(seed=args.seed, quick=args.quick, obq_max_macs=args.obq_max_macs, timeout=args.timeout,
                        keep_models=args.keep_models,
                        cli=tuple(shlex.split(args.onnxobq)) if args.onnxobq else default_cli(),
                        extra_args=tuple(shlex.split(args.quantize_args)), reuse_hessians=not args.capture_each)
    entries = make_grid(methods, bits, bns)
    status = 0
    for name in names:
        case = load_case(name)
        if args.threads is not None and hasattr(case, "threads"):
            case.threads = args.threads
        try:
            records = run_case(case, entries, args.out, cfg, log=lambda s: print(s, flush=True))
        except FP32Mismatch as exc:
            print(f"run.py: FP32 MISMATCH, the harness does not reproduce docs/benchmarks.md:\n{exc}\n"
                  f"(see {args.out / name / 'fp32.json'}); no quantized run was made", file=sys.stderr)
            return 1
        except (CaseUnavailable, ValueError) as exc:
            print(f"run.py: error: {name}: {exc}", file=sys.stderr)
            return 2
        if any(r["status"] in ("failed", "timeout") for r in records):
            status = 3
    finish(args.out, args.plots)
    return status


def finish(out: Path, plots: bool) -> None:
    """Write OUT/table.md and, when asked, the plots under OUT/plots."""
    from bench import table

    records = table.load_records(out)
    if records:
        (out / "table.md").write_text(table.markdown(records))
        print(f"wrote {out / 'table.md'}")
    if plots and records:
        from bench import plots as plotting
        for path in plotting.draw_all(records, out / "plots"):
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
