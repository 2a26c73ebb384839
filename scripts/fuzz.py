#!/usr/bin/env python
"""Quantize thousands of random small models and report every run that misbehaves.

Each case draws a random model and random settings (tests/fuzzmodels.py) and quantizes it
through the command line as fake and as qdq; tests/fuzzcheck.py says what counts as a failure
(a traceback, an exit status other than 0 or a one-line 2, an output that fails onnx's checker
or onnxruntime, non-finite outputs, fake and qdq that disagree). Case ``index`` of ``seed`` is
always the same model and settings, so a failure is reproduced with ``--seed S --start I
--count 1``. tests/test_fuzz.py runs about 60 cases in CI.

Prints one line per failure and a summary, and exits with status 1 if any case failed.

Examples::

    python scripts/fuzz.py --count 2000 --seed 1
    python scripts/fuzz.py --seed 1 --start 17 --count 1 --keep /tmp/case17 -v
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")      # as `onnxobq` sets it (onnxobq/__main__.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from fuzzcheck import CaseResult, check_case, describe  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: --count, --seed, --start, --keep, --subprocess-every, -v."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=100, help="cases to run (default 100)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the cases (default 0)")
    p.add_argument("--start", type=int, default=0, help="the index of the first case (default 0)")
    p.add_argument("--keep", metavar="DIR", help="copy each failing case's files (model, calibration data, "
                                                 "outputs, the commands) to DIR/seed<S>_<index>")
    p.add_argument("--subprocess-every", type=int, default=25, metavar="K",
                   help="run every K-th case's first quantization as `python -m onnxobq` in a child "
                        "process, to see its real stderr (0: never; default 25)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each case's refusals and notes")
    return p.parse_args(argv)


def failure_class(problem: str) -> str:
    """A failure without its numbers, names and paths, to count like failures together."""
    text = re.sub(r"(?<!\w)/\S+", "PATH", problem)                # paths, not fake/qdq
    text = re.sub(r"'[^']*'", "'…'", text)
    return re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "#", text)[:160]


def keep_case(result: CaseResult, workdir: str, keep: str) -> str:
    """Copy a failing case's files to ``keep``, with its settings and commands."""
    dest = os.path.join(keep, f"seed{result.seed}_{result.index}")
    shutil.copytree(workdir, dest, dirs_exist_ok=True)
    with open(os.path.join(dest, "case.txt"), "w") as f:
        f.write(f"settings: {describe(result.settings)}\n")
        for fmt, argv in result.argv.items():
            f.write(f"{fmt}: onnxobq {' '.join(a.replace(workdir, dest) for a in argv)}\n")
        f.write("".join(f"problem: {p}\n" for p in result.problems))
    return dest


def run_case(seed: int, index: int, args) -> CaseResult:
    """One case in a fresh folder; a failure of the harness itself counts as a failure."""
    with tempfile.TemporaryDirectory(prefix="onnxobq-fuzz-") as workdir:
        use_child = args.subprocess_every > 0 and index % args.subprocess_every == 0
        try:
            result = check_case(seed, index, workdir, subprocess=use_child)
        except Exception as e:                              # noqa: BLE001 - report and go on
            result = CaseResult(seed, index, {}, problems=[f"harness: {type(e).__name__}: {e}"])
        if result.problems and args.keep:
            result.notes.append(f"kept in {keep_case(result, workdir, args.keep)}")
    return result


def main(argv=None) -> int:
    """Run the cases, print each failure as it comes and a summary; 1 if any case failed."""
    args = parse_args(argv)
    classes, exits, refusals = collections.Counter(), collections.Counter(), 0
    failed, start = 0, time.perf_counter()
    for index in range(args.start, args.start + args.count):
        result = run_case(args.seed, index, args)
        exits.update(f"{fmt} {'traceback' if code is None else f'exit {code}'}" for fmt, code in result.codes.items())
        refusals += any("refused" in n for n in result.notes)
        failed += bool(result.problems)
        for problem in result.problems:
            print(result.line(problem), flush=True)
            classes[failure_class(problem)] += 1
        if args.verbose:
            print("".join(f"  seed={args.seed} index={index} note: {n}\n" for n in result.notes), end="")
    seconds = time.perf_counter() - start
    print(f"\n{args.count} cases (seed {args.seed}, from index {args.start}) in {seconds:.0f} s: "
          f"{args.count - failed} passed, {failed} failed; {refusals} with a one-line refusal")
    print("exits: " + ", ".join(f"{k}: {v}" for k, v in sorted(exits.items())))
    for text, n in classes.most_common():
        print(f"{n:6d}  {text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
