"""Signals and concurrent writers: a run that is stopped, or that races another, leaves either its
whole output or nothing, and no temporary files."""
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import onnx

import builders


def _folder(tmp_path):
    """m.onnx (a small conv model), ext.onnx (the same with its weights in ext.onnx.data, so that its
    output has a data file too) and c.npz, its calibration data; returns the folder's file names."""
    onnx.save(builders.conv_stack(), tmp_path / "m.onnx")
    onnx.save(builders.conv_stack(), tmp_path / "ext.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    np.savez(tmp_path / "c.npz", x=builders.rng(3).standard_normal((4, 3, 12, 12)).astype(np.float32))
    return sorted(p.name for p in tmp_path.iterdir())


def _cli_with(tmp_path, patch: str, *args) -> subprocess.CompletedProcess:
    """``onnxobq quantize *args --calib c.npz`` in a child whose ``patch`` (Python run first) sends
    it a signal at a chosen point."""
    code = "import os, signal, sys, time\n" + textwrap.dedent(patch) + textwrap.dedent("""
        from onnxobq.__main__ import main
        sys.argv = ["onnxobq", "quantize", *sys.argv[1:], "--calib", "c.npz", "-q"]
        sys.exit(main())
    """)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_sigterm_while_the_model_is_saved_leaves_nothing(tmp_path):
    """(was: the process died at once, leaving a hidden .onnxobq-* folder with a half-written model)"""
    before = _folder(tmp_path)
    done = _cli_with(tmp_path, """
        import onnx
        real = onnx.save_model
        def save(*a, **k):
            real(*a, **k)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        onnx.save_model = save
    """, "m.onnx", "-o", "q.onnx")
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "onnxobq: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_interrupt_between_the_renames_leaves_neither_file(tmp_path):
    """Ctrl-C after the data file is renamed into place and before the model is (was: an
    orphan q.onnx.data)."""
    before = _folder(tmp_path)
    done = _cli_with(tmp_path, """
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if str(dst).endswith(".data"):
                os.kill(os.getpid(), signal.SIGINT)
        os.replace = replace
    """, "ext.onnx", "-o", "q.onnx")
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "onnxobq: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path):
    """(was: a KeyboardInterrupt traceback)"""
    code = textwrap.dedent("""
        import sys
        class Stop:
            def find_spec(self, name, *a):
                if name == "click":
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Stop())
        from onnxobq.__main__ import main
        sys.exit(main())
    """)
    done = subprocess.run([sys.executable, "-c", code, "inspect", "m.onnx"], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (130, "onnxobq: interrupted\n")


def test_two_runs_publish_one_at_a_time(tmp_path):
    """While one run renames its model and data file into a folder, another waits: each output
    pair is one run's (was: one run's model with the other's data, "offset out of bounds")."""
    from onnxobq.files import publishing
    events = []

    def second():
        with publishing(str(tmp_path)):
            events.append("second")

    with publishing(str(tmp_path)):
        other = threading.Thread(target=second)
        other.start()
        time.sleep(0.3)
        events.append("first done")
    other.join(10)
    assert events == ["first done", "second"]


def _command(*args) -> list[str]:
    return [sys.executable, "-c", "import sys; from onnxobq.__main__ import main; sys.exit(main())", *args]


def test_a_summary_that_cannot_be_written_keeps_no_output(tmp_path):
    """stdout on a full disk (was: exit 2 with the model left in place)"""
    import os
    import pytest
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    before = _folder(tmp_path)
    with open("/dev/full", "w") as full:
        done = subprocess.run(_command("quantize", "m.onnx", "--method", "rtn", "-o", "q.onnx"), cwd=tmp_path,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == ("onnxobq: error: standard output: cannot write the summary (No space left on device); "
                           "nothing was kept: send the output where it can be written, or give -q\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_reader_that_stops_early_ends_the_listing_quietly(tmp_path):
    """onnxobq inspect --json | head -c 10 (was: exit 1): the listing of 600 layers is past a
    pipe's 64 KiB, so the child is still writing when the reader stops."""
    from onnx import helper, numpy_helper
    w = [numpy_helper.from_array(np.eye(2, dtype=np.float32), f"w{i}") for i in range(600)]
    nodes = [helper.make_node("MatMul", [f"h{i}" if i else "x", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}")
             for i in range(600)]
    onnx.save(builders.make_model(nodes, [builders.fvi("x", [None, 2])], [builders.fvi("h600", [None, 2])], w),
              tmp_path / "long.onnx")
    child = subprocess.Popen(_command("inspect", "--json", "long.onnx"), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, bufsize=0)
    first = child.stdout.read(10)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert first and child.wait(60) == 0 and err == ""
    whole = subprocess.run(_command("inspect", "--json", "long.onnx"), cwd=tmp_path, capture_output=True, timeout=60)
    assert len(whole.stdout) > 1 << 16


def test_sigterm_while_onnxruntime_reads_a_big_models_copy_leaves_no_temporary_files(tmp_path):
    """Past 2 GB (here: past a lowered limit) onnxruntime reads a temporary copy of the model
    (was: a SIGTERM then left the copy in $TMPDIR)."""
    import os
    before = _folder(tmp_path)
    scratch = tmp_path.parent / (tmp_path.name + "-tmp")
    scratch.mkdir()
    code = "import os, signal, sys, time\n" + textwrap.dedent("""
        from onnxobq.graph import io
        io.EXTERNAL_DATA_THRESHOLD = 100
        import onnxruntime as ort
        real = ort.InferenceSession
        def session(source, *a, **k):
            if isinstance(source, str) and source.endswith("model.onnx"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            return real(source, *a, **k)
        ort.InferenceSession = session
        from onnxobq.__main__ import main
        sys.argv = ["onnxobq", "quantize", "m.onnx", "--calib", "c.npz", "-o", "q.onnx", "-q"]
        sys.exit(main())
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(scratch)})
    assert (done.returncode, done.stderr) == (143, "onnxobq: terminated\n")
    assert [p.name for p in scratch.iterdir() if p.name.startswith("onnxobq-")] == []   # onnxruntime writes .ses
    assert sorted(p.name for p in tmp_path.iterdir()) == before
