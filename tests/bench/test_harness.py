"""The benchmark harness end to end on the synthetic case: JSON schema, table, resume, FP32 check."""
import json

import pytest

from bench import run as run_cli
from bench import table
from bench.case import FP32Mismatch
from bench.cases.synthetic import SyntheticCase
from bench.harness import SCHEMA, GridEntry, HarnessConfig, make_grid, run_case

NUMBER = (int, float)
# field -> allowed types, for every record
COMMON = {
    "schema": str, "kind": str, "case": str, "package": str, "primary": str, "higher_is_better": bool,
    "seed": int, "quick": bool, "data": dict, "versions": dict, "machine": dict, "started": str,
    "finished": str, "status": str, "method": str, "bits": int,
}
# field -> allowed types, for a run measured without trouble
RUN_OK = {
    "run_id": str, "label": str, "order": (str, type(None)), "bn": bool, "reason": type(None),
    "command": str, "metrics": dict, "primary_value": NUMBER, "agreement": list, "quant_seconds": NUMBER,
    "report_seconds": NUMBER, "stages_seconds": dict, "peak_rss_mb": NUMBER, "layers": list,
    "layers_skipped": list, "bn_report": dict, "eval_seconds": NUMBER, "compare_seconds": NUMBER,
    "device": str, "calibration_samples": int, "quantize_settings": dict,
    "hessians": str, "capture_seconds": NUMBER, "quant_seconds_measured": NUMBER,
}
VERSIONS = ("python", "onnxobq", "onnx", "onnxruntime", "numpy")
MACHINE = ("platform", "machine", "cpu", "cpu_count", "usable_cores")


def check_fields(record: dict, fields: dict) -> None:
    for key, types in fields.items():
        assert key in record, f"{record.get('run_id', record['kind'])}: no field {key!r}"
        assert isinstance(record[key], types), f"{key}: {type(record[key]).__name__}, not {types}"


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    case = SyntheticCase(root=root / "model", eval_samples=32)
    entries = [GridEntry("rtn", 4, False), GridEntry("fastobq_sensi_des", 4, True), GridEntry("obq", 4, False)]
    cfg = HarnessConfig(seed=3, obq_max_macs=1e3)          # the synthetic model needs more: OBQ is skipped
    records = run_case(case, entries, root / "out", cfg, log=lambda s: None)
    return case, entries, cfg, root / "out", records


def test_records_follow_the_schema(grid_run):
    _, entries, _, out, records = grid_run
    on_disk = [json.loads((out / "synthetic" / "runs" / f"{e.run_id}.json").read_text()) for e in entries]
    fp32 = json.loads((out / "synthetic" / "fp32.json").read_text())
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "skipped"]
    assert on_disk == records[1:] and fp32 == records[0]

    for r in [fp32] + on_disk:
        check_fields(r, COMMON)
        assert r["schema"] == SCHEMA and r["seed"] == 3 and r["case"] == "synthetic"
        assert all(r["versions"][k] for k in VERSIONS)
        assert all(r["machine"][k] for k in MACHINE)
    assert fp32["metrics"] == {"accuracy": 1.0, "mse": 0.0} and fp32["misses"] == []

    rtn, fastobq, obq = on_disk
    for r in (rtn, fastobq):
        check_fields(r, RUN_OK)
        assert set(r["metrics"]) == {"accuracy", "mse"}
        assert r["primary_value"] == r["metrics"]["accuracy"]
        assert [a["output"] for a in r["agreement"]] == ["y"]
        assert set(r["agreement"][0]) == {"output", "sqnr_db", "cosine", "top1_agreement"}
        assert 0 < r["agreement"][0]["cosine"] <= 1
        assert [l["name"] for l in r["layers"]] == ["conv1", "conv2", "fc"]
        assert all(isinstance(l["error"], float) and l["bits"] == 4 for l in r["layers"])
        assert "--report" in r["command"] and "--bits 4" in r["command"]
    assert (rtn["method"], rtn["order"], rtn["bn"]) == ("rtn", None, False)
    assert "--no-bn-reestimate" in rtn["command"]
    assert (fastobq["method"], fastobq["order"], fastobq["bn"]) == ("fastobq", "sensi_des", True)
    assert "--order sensi_des" in fastobq["command"] and "--no-bn-reestimate" not in fastobq["command"]
    # The first run saves the case's Hessians, later ones load them and count the saving run's capture.
    hessians = str(out / "synthetic" / "data" / "hessians.npz")
    assert (rtn["hessians"], fastobq["hessians"]) == ("saved", "loaded")
    assert f"--save-hessians {hessians}" in rtn["command"] and f"--hessians {hessians}" in fastobq["command"]
    assert rtn["capture_seconds"] == rtn["stages_seconds"]["capture"] == fastobq["capture_seconds"]
    assert "capture" not in fastobq["stages_seconds"]
    assert rtn["quant_seconds"] == rtn["quant_seconds_measured"]
    assert fastobq["quant_seconds"] == round(fastobq["quant_seconds_measured"] + rtn["capture_seconds"], 3)
    assert obq["command"] is None and "--obq-max-macs 1.0e+03" in obq["reason"]
    # sum of R * C^3: conv1 16 * 72^3 + conv2 16 * 16^3 + fc 10 * 16^3 = 6,078,464
    assert obq["short_reason"] == "6.1e+06 MACs > 1e+03" and "6.1e+06 multiply-adds" in obq["reason"]
    assert not list((out / "synthetic" / "models").glob("*.onnx"))   # deleted unless keep_models


def test_table_rows_and_cells(grid_run):
    _, _, _, out, records = grid_run
    text = table.markdown(table.load_records(out))
    lines = text.splitlines()
    assert "## synthetic: accuracy (higher is better)" in lines
    head = lines.index("| method | W4 BN on | W4 BN off | mean quant s (solve s) |")
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[head + 2:head + 6]]
    rtn, fastobq, obq = records[1:]
    assert rows[0] == ["**FP32**", "1.000", "1.000", "-"]
    assert rows[1][:3] == ["rtn", "not run", table.fmt_metric(rtn["primary_value"])]
    assert rows[2][:3] == ["fastobq_sensi_des", table.fmt_metric(fastobq["primary_value"]), "not run"]
    assert rows[3] == ["obq", "not run", "skipped (6.1e+06 MACs > 1e+03)", "-"]
    assert rows[1][3] == f"{rtn['quant_seconds']:.1f} ({rtn['stages_seconds']['solve']:.1f})"
    assert f"| fastobq_sensi_des | {table.fmt_agreement(fastobq)} | not run |" in lines


def test_resume_keeps_finished_runs(grid_run):
    case, entries, cfg, out, records = grid_run
    seen = []
    again = run_case(case, entries[:2], out, cfg, log=seen.append)
    assert again[1:] == records[1:3]
    assert sum("done before" in s for s in seen) == 2
    with pytest.raises(ValueError, match="seed 3"):     # one folder, one seed
        run_case(case, entries[:1], out, HarnessConfig(seed=4), log=lambda s: None)


class WrongFigures(SyntheticCase):
    fp32_expected = {"accuracy": (0.5, 0.01), "mse": (1.0, 0.1), "missing": (1.0, 0.0)}


def test_fp32_mismatch_fails_loudly(tmp_path):
    case = WrongFigures(root=tmp_path / "model", eval_samples=8)
    with pytest.raises(FP32Mismatch) as info:
        run_case(case, make_grid(["rtn"], [4], [False]), tmp_path / "out", log=lambda s: None)
    message = str(info.value)
    assert "accuracy: got 1.0" in message and "mse: got 0.0" in message and "missing: got None" in message
    record = json.loads((tmp_path / "out" / "synthetic" / "fp32.json").read_text())
    assert record["status"] == "mismatch" and len(record["misses"]) == 3
    assert not (tmp_path / "out" / "synthetic" / "runs").exists()


def test_run_cli_exits_1_on_fp32_mismatch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_cli, "load_case", lambda name: WrongFigures(root=tmp_path / "model", eval_samples=8))
    status = run_cli.main(["--case", "synthetic", "--methods", "rtn", "--bits", "4", "--bn", "off",
                           "--out", str(tmp_path / "out")])
    assert status == 1
    assert "FP32 MISMATCH" in capsys.readouterr().err


def test_plots_are_written(grid_run, tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plots

    written = plots.draw_all(grid_run[4], tmp_path)
    assert sorted(p.name for p in written) == ["synthetic_fig1_layer_error.png", "synthetic_metric_vs_bits.png",
                                               "synthetic_time.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_layer_error_ratio_is_the_geometric_mean_against_rtn():
    layers = [dict(error=0.1, rtn_error=1.0), dict(error=0.8, rtn_error=2.0),      # ratios 0.1 and 0.4
              dict(error=None, rtn_error=None), dict(error=0.5, rtn_error=0.0)]    # no Hessian / zero output
    assert table.layer_error_ratio({"layers": layers}) == pytest.approx(0.2)       # sqrt(0.1 * 0.4)
    assert table.fmt_ratio({"layers": layers}) == "0.200"
    assert table.layer_error_ratio({"layers": []}) is None and table.fmt_ratio({}) == "-"


def test_headline_table_across_cases():
    def rec(case, kind, label, bits, value, status="ok"):
        return dict(case=case, kind=kind, label=label, bits=bits, bn=True, status=status, primary_value=value,
                    primary="cer" if case == "b" else "acc", higher_is_better=case != "b",
                    short_reason="too slow")
    records = [rec("a", "fp32", "fp32", 32, 0.9), rec("a", "run", "rtn", 4, 0.5), rec("a", "run", "obq", 4, None, "skipped"),
               rec("b", "fp32", "fp32", 32, 0.01), rec("b", "run", "rtn", 4, 0.25), rec("b", "run", "rtn", 3, 1.0)]
    lines = table.headline(records, bits=(4, 3)).splitlines()
    assert lines[0] == "| method | a acc W4 | a acc W3 | b cer W4 | b cer W3 |"
    assert lines[2] == "| **FP32** | 0.900 | 0.900 | 0.0100 | 0.0100 |"
    assert lines[3] == "| rtn | 0.500 | not run | 0.250 | 1.000 |"
    assert lines[4] == "| obq | skipped (too slow) | not run | not run | not run |"
    assert lines[-1] == "BN re-estimation on; better is a: higher, b: lower."


def test_case_data_is_reused_for_the_same_seed_and_made_again_for_another(tmp_path):
    from bench.harness import case_data

    made = []

    class Counting(SyntheticCase):
        def make_data(self, out_dir, seed, quick=False):
            made.append(seed)
            return super().make_data(out_dir, seed, quick)

    case = Counting()
    first, reused = case_data(case, tmp_path / "data", 3, True)
    again, reused_again = case_data(case, tmp_path / "data", 3, True)
    assert (reused, reused_again, made) == (False, True, [3])
    assert (again.calib, again.held_out, again.calib_args) == (first.calib, first.held_out, first.calib_args)
    _, reused_other = case_data(case, tmp_path / "data", 4, True)
    assert reused_other is False and made == [3, 4]


def test_saved_hessians_are_dropped_when_the_data_are_made_again(tmp_path):
    """Hessians left from other data (a stale file) are not loaded: the first run captures anew."""
    data = tmp_path / "out" / "synthetic" / "data"
    data.mkdir(parents=True)
    (data / "hessians.npz").write_bytes(b"stale")
    (data / "hessians.json").write_text('{"capture_seconds": 1.0}')
    case = SyntheticCase(root=tmp_path / "model", eval_samples=16)
    records = run_case(case, [GridEntry("fastobq_sensi_des", 4, False)], tmp_path / "out", HarnessConfig(seed=5),
                       log=lambda s: None)
    assert records[1]["status"] == "ok" and records[1]["hessians"] == "saved"
    assert (data / "hessians.npz").read_bytes()[:2] == b"PK"      # an .npz written by this run
