"""The benchmark runner: one case, a grid of quantizer settings, one JSON file per run.

For a case (see ``bench.case``) the harness

1. finds (or installs) the FP32 model and generates the data from the seed;
2. evaluates the FP32 model and checks it against docs/benchmarks.md
   (``FP32Mismatch``, naming every missed figure, when it does not reproduce them);
3. runs ``onnxobq quantize`` as a subprocess once per grid entry, with ``--report``;
4. evaluates each quantized model with the case's own metric, measures its output
   agreement with FP32 on the held-out inputs (``onnxobq.compare``),
   and writes ``OUT/CASE/runs/RUN_ID.json``.

The Hessians depend only on the model and the calibration data, so the first run of a
case that captures them saves them (``--save-hessians OUT/CASE/data/hessians.npz``) and
every later run loads them (``--hessians``). A run that loaded them reports the time it
measured plus the capture time of the run that saved them, so that every method's
time still counts a capture.

Runs whose JSON already says ``"status": "ok"`` are not run again (resume); skipped,
failed and timed-out runs are. One output folder holds one seed and one size
(``quick`` or not): the harness refuses to mix them.

Exact OBQ costs O(d_row * d_col^3) per layer. It is skipped, with the reason written
in its JSON and shown in the table, when it would take more than ``obq_max_macs``
multiply-adds over the model (``--obq-max-macs``, default 5e11). That admits the
orientation classifier (3.0e11) and skips the recognizer (1.8e12: its 1x3 Convs over 960
channels alone would take most of an hour on two CPU cores), the detector (6.5e12) and
MiniLM.

Record schema (``"schema": "onnxobq-bench/1"``), written as JSON (an SQNR of a model
identical to FP32 is written as ``Infinity``):

* every record: schema, kind ("fp32" | "run"), case, package, primary, higher_is_better,
  seed, quick, data {calib, calib_args, held_out}, versions {python, onnxobq, onnx,
  onnxruntime, numpy, onnx_graphsurgeon, <case package>, onnxobq_git}, machine {platform,
  machine, cpu, cpu_count, usable_cores, memory_gb, thread_env}, started, finished,
  status, method, bits;
* ``fp32.json``: method "fp32", bits 32, order/bn null, model, metrics, primary_value,
  expected {metric: [value, tolerance]}, misses [str], status "ok" | "mismatch", eval_seconds;
* ``runs/RUN_ID.json``: run_id, label (the grid method), method, order, bn, status
  ("ok" | "skipped" | "failed" | "timeout"), reason and short_reason (null when ok),
  command (null when skipped); when ok also metrics, primary_value, agreement
  [{output, sqnr_db, cosine, top1_agreement}], quant_seconds (wall time of the
  subprocess, plus capture_seconds when the Hessians were loaded), hessians ("captured",
  "saved" or "loaded"), capture_seconds (the capture stage of the run that measured it),
  quant_seconds_measured (the wall time of the subprocess alone), report_seconds and stages_seconds (from ``--report``), peak_rss_mb,
  peak_gpu_mb, device, calibration_samples, storage, bn_report, quantize_settings
  (every onnxobq setting, from ``--report``), layers (per-layer
  figures of ``--report``: name, op, shape, groups, bits, method, error, rtn_error,
  seconds, damp, cols, rows, note), layers_skipped, eval_seconds, compare_seconds.
"""
from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import os
import pickle
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from bench.case import Case, CaseData, FP32Mismatch, check_fp32

SCHEMA = "onnxobq-bench/1"

#: Grid method name -> (``onnxobq quantize --method``, ``--order`` or None), in table order.
METHODS: dict[str, tuple[str, str | None]] = {
    "rtn": ("rtn", None),
    "gptq": ("gptq", None),
    "gptq_act": ("gptq", "act"),
    **{f"fastobq_{o}": ("fastobq", o) for o in
       ("sensi_des", "sensi_asc", "err_des", "err_asc", "w_des", "w_asc")},
    "obq": ("obq", None),
}
DEFAULT_BITS = (8, 6, 4, 3)
DEFAULT_OBQ_MAX_MACS = 5e11
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class GridEntry:
    """One quantizer setting: a grid method (a key of ``METHODS``), a bit width, BN on or off."""

    method: str
    bits: int
    bn: bool

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")

    @property
    def run_id(self) -> str:
        return f"{self.method}_w{self.bits}_bn{'on' if self.bn else 'off'}"

    def args(self) -> list[str]:
        """The ``onnxobq quantize`` options of this setting."""
        method, order = METHODS[self.method]
        return (["--method", method] + (["--order", order] if order else []) + ["--bits", str(self.bits)]
                + ([] if self.bn else ["--no-bn-reestimate"]))


def make_grid(methods, bits=DEFAULT_BITS, bns=(True, False)) -> list[GridEntry]:
    """Every combination, method-major."""
    return [GridEntry(m, b, bn) for m in methods for b in bits for bn in bns]


def default_cli() -> tuple[str, ...]:
    """The argv prefix that runs onnxobq: the ``onnxobq`` beside this Python, else ``python -m onnxobq``."""
    exe = Path(sys.executable).with_name("onnxobq")
    if exe.is_file():
        return (str(exe),)
    found = shutil.which("onnxobq")
    return (found,) if found else (sys.executable, "-m", "onnxobq")


@dataclass(frozen=True)
class HarnessConfig:
    """Settings shared by every run.

    Args:
        seed: seed of the case's data (default 0: the sets docs/benchmarks.md measured).
        quick: the case's smaller evaluation sets.
        obq_max_macs: skip exact OBQ when it would take more multiply-adds than this.
        timeout: seconds one ``onnxobq quantize`` may take (None: no limit).
        keep_models: keep the quantized models (default: delete each after measuring it).
        cli: the argv prefix that runs onnxobq.
        extra_args: more ``onnxobq quantize`` options for every run, e.g. ``("--device", "cpu")``.
        reuse_hessians: capture each case's Hessians once and load them in later runs.
    """

    seed: int = 0
    quick: bool = False
    obq_max_macs: float = DEFAULT_OBQ_MAX_MACS
    timeout: float | None = None
    keep_models: bool = False
    cli: tuple[str, ...] = field(default_factory=default_cli)
    extra_args: tuple[str, ...] = ()
    reuse_hessians: bool = True


# ----------------------------------------------------------------------------- environment

def versions(case: Case) -> dict:
    """Versions of Python, onnxobq (with its git commit), onnx, onnxruntime, numpy and the case's package."""
    out = {"python": platform.python_version()}
    dists = ["onnxobq", "onnx", "onnxruntime", "numpy", "onnx_graphsurgeon"]
    package = getattr(case, "package", "")
    if package:
        dists.append(package.split("==")[0])
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["onnxobq_git"] = _git_commit()
    return out


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def machine() -> dict:
    """Platform, CPU model, core counts and memory of this machine."""
    cpu = platform.processor() or None
    mem_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
               if k in os.environ}
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "usable_cores": usable, "memory_gb": mem_gb, "thread_env": threads}


# ----------------------------------------------------------------------------- records

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(record: dict, path: Path) -> None:
    """Write a record atomically, so that an interrupted run leaves no half file to resume from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


def base_record(case: Case, kind: str, cfg: HarnessConfig, env: dict, data: CaseData) -> dict:
    """The fields every record has, whatever its kind ("fp32" or "run") and status."""
    return {"schema": SCHEMA, "kind": kind, "case": case.name, "package": getattr(case, "package", ""),
            "primary": case.primary, "higher_is_better": case.higher_is_better,
            "seed": cfg.seed, "quick": cfg.quick,
            "data": {"calib": data.calib, "calib_args": list(data.calib_args), "held_out": data.held_out},
            "versions": env["versions"], "machine": env["machine"], "started": _now()}


def expected_fp32(case: Case, seed: int, quick: bool) -> dict[str, tuple[float, float]]:
    """The FP32 figures to check: ``case.fp32_expected_for(seed, quick)`` where the case has it
    (its expectation depends on the sample), else ``case.fp32_expected``."""
    if hasattr(case, "fp32_expected_for"):
        return case.fp32_expected_for(seed, quick)
    return dict(case.fp32_expected)


def evaluate_fp32(case: Case, model: Path, data: CaseData, cfg: HarnessConfig, env: dict,
                  case_dir: Path) -> dict:
    """Evaluate the FP32 model, write ``fp32.json``, and raise if it misses docs/benchmarks.md.

    Raises:
        FP32Mismatch: one line per missed figure (``fp32.json`` is written first, with
            ``"status": "mismatch"``).
    """
    record = base_record(case, "fp32", cfg, env, data)
    start = time.perf_counter()
    metrics = case.evaluate(model, data)
    expected = expected_fp32(case, cfg.seed, cfg.quick)
    misses = check_fp32(types.SimpleNamespace(name=case.name, fp32_expected=expected), metrics)
    record.update(method="fp32", order=None, bits=32, bn=None, model=str(model), metrics=metrics,
                  primary_value=metrics.get(case.primary), expected={k: list(v) for k, v in expected.items()},
                  misses=misses, status="mismatch" if misses else "ok",
                  eval_seconds=round(time.perf_counter() - start, 2), finished=_now())
    write_json(record, case_dir / "fp32.json")
    if misses:
        raise FP32Mismatch("\n".join(misses))
    return record


def obq_macs(layers) -> float:
    """Multiply-adds of exact OBQ over these layers as implemented: sum of G*R*C^3
    (each row downdates its own C x C inverse Hessian C times)."""
    return float(sum(l.groups * l.rows * l.cols ** 3 for l in layers))


def obq_skip_reason(layers, max_macs: float) -> tuple[str, str] | None:
    """Why exact OBQ is skipped on these layers, long and short, or None when it runs.

    Args:
        layers: ``onnxobq.inspect(...).quantizable``.
        max_macs: the most multiply-adds OBQ may take over the model.
    """
    if not layers:
        return None
    cost = obq_macs(layers)
    if cost <= max_macs:
        return None
    widest = max(layers, key=lambda l: l.groups * l.rows * l.cols ** 3)
    return (f"exact OBQ is O(d_row*d_col^3): about {cost:.1e} multiply-adds over the model "
            f"> --obq-max-macs {max_macs:.1e} (the largest, layer {widest.name}, is "
            f"{widest.rows} x {widest.cols})", f"{cost:.1e} MACs > {max_macs:.0e}")


# ----------------------------------------------------------------------------- runs

def quantize_command(cfg: HarnessConfig, model: Path, data: CaseData, entry: GridEntry,
                     output: Path, report: Path, hessian_args: tuple[str, ...] = ()) -> list[str]:
    """The ``onnxobq quantize`` argv of one grid entry."""
    return [*cfg.cli, "quantize", str(model), "--calib", data.calib, *data.calib_args, *entry.args(),
            "-o", str(output), "--report", str(report), "--overwrite", "-q", *hessian_args, *cfg.extra_args]


@dataclass(frozen=True)
class HessianCache:
    """A case's saved Hessians (``path``) and the capture time of the run that saved them."""

    path: Path

    @property
    def stamp(self) -> Path:
        return self.path.with_suffix(".json")

    def capture_seconds(self) -> float | None:
        """The saving run's capture time, or None when nothing usable is saved."""
        if not (self.path.is_file() and self.stamp.is_file()):
            return None
        return json.loads(self.stamp.read_text())["capture_seconds"]

    def args(self) -> tuple[str, ...]:
        flag = "--hessians" if self.capture_seconds() is not None else "--save-hessians"
        return (flag, str(self.path))

    def saved(self, report: dict) -> None:
        self.stamp.write_text(json.dumps({"capture_seconds": report["stages_seconds"]["capture"]}))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.stamp.unlink(missing_ok=True)


def _tail(text: str) -> str:
    lines = [l for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def run_entry(case: Case, model: Path, data: CaseData, entry: GridEntry, cfg: HarnessConfig, env: dict,
              case_dir: Path, layers, cache: HessianCache | None = None) -> dict:
    """Quantize, evaluate and compare one grid entry; the record says how it went."""
    record = base_record(case, "run", cfg, env, data)
    method, order = METHODS[entry.method]
    record.update(run_id=entry.run_id, label=entry.method, method=method, order=order, bits=entry.bits,
                  bn=entry.bn, status="ok", reason=None, short_reason=None, command=None)
    if method == "obq":
        skip = obq_skip_reason(layers, cfg.obq_max_macs)
        if skip:
            record.update(status="skipped", reason=skip[0], short_reason=skip[1], finished=_now())
            return record
    output = case_dir / "models" / f"{entry.run_id}.onnx"
    report_path = case_dir / "reports" / f"{entry.run_id}.report.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    hessian_args = cache.args() if cache else ()
    cmd = quantize_command(cfg, model, data, entry, output, report_path, hessian_args)
    record["command"] = shlex.join(cmd)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout)
    except subprocess.TimeoutExpired:
        record.update(status="timeout", reason=f"onnxobq quantize ran past --timeout {cfg.timeout:g} s",
                      short_reason=f"> {cfg.timeout:g} s", finished=_now())
        return record
    record["quant_seconds"] = record["quant_seconds_measured"] = round(time.perf_counter() - start, 3)
    if done.returncode != 0 or not output.is_file() or not report_path.is_file():
        why = _tail(done.stderr) or _tail(done.stdout) or "no output model"
        record.update(status="failed", reason=f"onnxobq quantize exit status {done.returncode}: {why}",
                      short_reason=f"exit {done.returncode}", finished=_now())
        return record
    report = json.loads(report_path.read_text())
    record["capture_seconds"] = report.get("stages_seconds", {}).get("capture")
    flag = hessian_args[0] if hessian_args else None
    record["hessians"] = {"--hessians": "loaded", "--save-hessians": "saved"}.get(flag, "captured")
    if record["hessians"] == "saved":
        cache.saved(report)
    elif record["hessians"] == "loaded":
        record["capture_seconds"] = cache.capture_seconds()
        record["quant_seconds"] = round(record["quant_seconds_measured"] + record["capture_seconds"], 3)
    try:
        record.update(measure(case, model, output, data, report))
    except Exception as exc:  # a model that does not run is a result too; keep going with the grid
        record.update(status="failed", reason=f"measuring failed: {type(exc).__name__}: {exc}",
                      short_reason="measuring failed")
    finally:
        if not cfg.keep_models:
            output.unlink(missing_ok=True)
            Path(str(output) + ".data").unlink(missing_ok=True)
    record["finished"] = _now()
    return record


def measure(case: Case, model: Path, output: Path, data: CaseData, report: dict) -> dict:
    """Task metrics, output agreement with FP32 and the report's figures for one quantized model."""
    import onnxobq

    start = time.perf_counter()
    metrics = case.evaluate(output, data)
    eval_seconds = time.perf_counter() - start
    agreement = []
    if data.held_out:
        if not data.held_out.lower().endswith((".npz", ".npy")):
            raise ValueError(f"held_out {data.held_out}: give an .npz of model inputs keyed by input name")
        start = time.perf_counter()
        agreement = [a.to_dict() for a in onnxobq.compare(str(model), str(output), data.held_out).outputs]
        compare_seconds = time.perf_counter() - start
    else:
        compare_seconds = 0.0
    return {"metrics": metrics, "primary_value": metrics.get(case.primary), "agreement": agreement,
            "report_seconds": report.get("total_seconds"), "stages_seconds": report.get("stages_seconds", {}),
            "peak_rss_mb": report.get("peak_rss_mb"), "peak_gpu_mb": report.get("peak_gpu_mb"),
            "device": report.get("device"), "calibration_samples": report.get("calibration_samples"),
            "storage": report.get("storage"), "bn_report": report.get("bn", {}),
            "quantize_settings": report.get("settings", {}),
            "layers": report.get("layers", []), "layers_skipped": report.get("skipped", []),
            "eval_seconds": round(eval_seconds, 2), "compare_seconds": round(compare_seconds, 2)}


def _check_folder(case_dir: Path, cfg: HarnessConfig) -> None:
    """Refuse to mix seeds or sizes in one folder (resume would mix their runs)."""
    fp32 = case_dir / "fp32.json"
    if fp32.is_file():
        old = json.loads(fp32.read_text())
        if (old.get("seed"), old.get("quick")) != (cfg.seed, cfg.quick):
            raise ValueError(f"{case_dir} holds runs of seed {old.get('seed')} quick={old.get('quick')}; "
                             f"give another output folder for seed {cfg.seed} quick={cfg.quick}")


def case_data(case: Case, data_dir: Path, seed: int, quick: bool) -> tuple[CaseData, bool]:
    """The case's data: made by ``case.make_data``, or reused from an earlier call.

    The data are deterministic in (seed, quick) and the case's code, so they are kept in
    ``data_dir/casedata.pkl`` under a key of those three (the code as the hash of the case's
    source file) and made again whenever the key differs.

    Returns:
        (data, reused).
    """
    source = Path(inspect.getsourcefile(type(case))).read_bytes()
    key = {"seed": seed, "quick": quick, "code": hashlib.sha256(source).hexdigest()}
    stamp = Path(data_dir) / "casedata.pkl"
    if stamp.is_file():
        try:
            saved = pickle.loads(stamp.read_bytes())
            if saved.get("key") == key:
                return saved["data"], True
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            pass
    data = case.make_data(Path(data_dir), seed, quick)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_bytes(pickle.dumps({"key": key, "data": data}))
    return data, False


def run_case(case: Case, entries: list[GridEntry], out_dir: Path, cfg: HarnessConfig = HarnessConfig(),
             log: Callable[[str], None] = print) -> list[dict]:
    """Check FP32, then run every grid entry of one case (resuming where ``OUT/CASE/runs`` has it).

    Returns:
        The FP32 record followed by one record per entry.

    Raises:
        FP32Mismatch: the FP32 model misses docs/benchmarks.md; no grid entry is run.
        CaseUnavailable: the case cannot run here.
    """
    case_dir = Path(out_dir) / case.name
    _check_folder(case_dir, cfg)
    env = {"versions": versions(case), "machine": machine()}
    model = case.model_path()
    start = time.perf_counter()
    data, reused = case_data(case, case_dir / "data", cfg.seed, cfg.quick)
    cache = HessianCache(case_dir / "data" / "hessians.npz") if cfg.reuse_hessians else None
    if cache and not reused:
        cache.clear()
    log(f"{case.name}: data {'reused' if reused else 'ready'} in {time.perf_counter() - start:.1f} s "
        f"(seed {cfg.seed}{', quick' if cfg.quick else ''})")
    fp32 = evaluate_fp32(case, model, data, cfg, env, case_dir)
    log(f"{case.name}: FP32 " + ", ".join(f"{k} {v:.4g}" for k, v in fp32["metrics"].items()) + " (matches)")
    layers = None
    records = [fp32]
    for entry in entries:
        path = case_dir / "runs" / f"{entry.run_id}.json"
        if path.is_file() and json.loads(path.read_text()).get("status") == "ok":
            log(f"{case.name} {entry.run_id}: done before ({path})")
            records.append(json.loads(path.read_text()))
            continue
        if layers is None and METHODS[entry.method][0] == "obq":
            import onnxobq
            layers = onnxobq.inspect(str(model)).quantizable
        record = run_entry(case, model, data, entry, cfg, env, case_dir, layers, cache)
        write_json(record, path)
        records.append(record)
        log(f"{case.name} {entry.run_id}: {summary(record)}")
    return records


def summary(record: dict) -> str:
    """One line about a record."""
    if record["status"] != "ok":
        return f"{record['status']}: {record['reason']}"
    agree = record["agreement"][0] if record.get("agreement") else None
    text = f"{record['primary']} {record['primary_value']:.4g}, quantized in {record['quant_seconds']:.1f} s"
    if agree:
        text += f", SQNR {agree['sqnr_db']:.1f} dB"
    return text
