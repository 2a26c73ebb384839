"""The package's shape: numerics free of onnx, short functions, a docstring on every module."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "onnxobq"
# The modules that hold numbers only: they import numpy, the backend and each other, never onnx,
# onnx-graphsurgeon or onnxruntime.
NUMERICS = ["onnxobq.types", "onnxobq.config", "onnxobq.errors", "onnxobq.backend", "onnxobq.metrics",
            "onnxobq.selection", "onnxobq.threads", "onnxobq.hessian", "onnxobq.hessian.unfold",
            "onnxobq.hessian.shifted", "onnxobq.hessian.sums", "onnxobq.quant", "onnxobq.quant.grid",
            "onnxobq.quant.activations", "onnxobq.solvers", "onnxobq.solvers.sweep", "onnxobq.solvers.obq",
            "onnxobq.solvers.common", "onnxobq.solve", "onnxobq.bn.stats", "onnxobq.calibration.sources"]


def test_the_numerics_import_without_onnx_or_onnxruntime():
    code = ("import sys\n"
            "for name in ('onnx', 'onnxruntime', 'onnx_graphsurgeon'):\n"
            "    sys.modules[name] = None          # any import of them now raises ImportError\n"
            f"import importlib\nfor m in {NUMERICS!r}:\n    importlib.import_module(m)\nprint('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "ok", done.stderr


def test_blocking_onnx_really_blocks_it():
    """The check above can fail: a module that needs onnx does not import with it blocked."""
    code = "import sys\nsys.modules['onnx'] = None\nimport onnxobq.graph.io\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and "import of onnx halted" in done.stderr


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def code_lines(fn: ast.FunctionDef) -> int:
    """A function's lines without its docstring."""
    first = fn.body[0]
    doc = (first.end_lineno - first.lineno + 1 if isinstance(first, ast.Expr)
           and isinstance(getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str) else 0)
    return fn.end_lineno - fn.lineno + 1 - doc


def test_no_function_is_over_80_lines():
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({code_lines(node)} lines)"
            for path in modules() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(node) > 80]
    assert long == []


def test_the_line_count_sees_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    fn = ast.parse(f'def f():\n    """Doc\n    string."""\n{body}\n').body[0]
    assert code_lines(fn) == 82


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_says_what_it_is_in_one_line(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path} has no docstring"
    first = doc.splitlines()[0]
    assert first.endswith((".", ":")) and len(first) <= 110, first


def test_nothing_refers_to_files_outside_the_repository():
    outside = re.compile(r"\.\./shared|shared/BENCHMARKS|/work/")
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "bench_out", "out")
                   and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith((".py", ".md", ".toml", ".sh", ".txt")) and name != "test_layout.py":
                path = Path(root) / name
                found += [f"{path.relative_to(REPO)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                          if outside.search(line)]
    assert found == []
