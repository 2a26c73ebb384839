"""The report's summary lines."""
from onnxobq.report import Report, summary_lines
from onnxobq.types import LayerStats


def stats(name, note=""):
    return LayerStats(name, "Conv", (4, 4), 1, 4, "fastobq", 1e-3, 2e-3, 0.01, 0.01, cols=4, rows=64, note=note)


def notes(layers):
    return [line for line in summary_lines(Report(settings={}, layers=layers, skipped=[]))
            if line.startswith("note:")]


def test_a_note_of_one_or_two_layers_is_one_line_each():
    assert notes([stats("a", "N"), stats("b"), stats("c", "N"), stats("d", "M")]) == [
        "note: a: N", "note: c: N", "note: d: M"]


def test_a_note_that_many_layers_share_is_one_line_naming_them():
    layers = [stats(f"l{i}", "N" if i != 2 else "M") for i in range(7)]
    assert notes(layers) == ["note: 6 layers (l0, l1, l3, l4 and 2 more), each: N", "note: l2: M"]
