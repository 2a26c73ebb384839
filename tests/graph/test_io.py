"""Models past protobuf's 2 GiB limit, simulated by lowering the limit."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxobq import runtime
from onnxobq.cli import main
from onnxobq.graph import io

import builders


def test_big_models_go_through_temporary_files(monkeypatch, tmp_path, capsys):
    onnx.save(builders.conv_stack(), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((8, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    args = ["quantize", str(tmp_path / "m.onnx"), "--bits", "4", "--calib", str(tmp_path / "c.npz"), "-q"]
    assert main(args + ["-o", str(tmp_path / "small.onnx")]) == 0
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)   # every model now counts as "big"
    sources = []
    real = ort.InferenceSession
    runtime.newest_opset(True), runtime.newest_opset(False)    # its probes are small models, read from bytes

    def spy(source, *a, **k):
        sources.append(source)
        return real(source, *a, **k)

    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    assert main(args + ["-o", str(tmp_path / "big.onnx")]) == 0, capsys.readouterr().err
    # every session reads a file: a temporary copy, or (the check of what was written) the output
    assert sources and all(isinstance(s, str) and s.endswith(("model.onnx", "big.onnx")) for s in sources)
    # its tensors are all under the 1 KB inline threshold, so no data file is needed
    assert not (tmp_path / "big.onnx.data").exists() and not (tmp_path / "small.onnx.data").exists()
    small = builders.run(onnx.load(tmp_path / "small.onnx"), {"x": x})[0]
    big = builders.run(onnx.load(tmp_path / "big.onnx"), {"x": x})[0]
    np.testing.assert_array_equal(big, small)


def test_serialized_leaves_the_model_as_it_was(monkeypatch):
    model = builders.conv_stack()
    before = model.SerializeToString()
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
    with io.serialized(model) as source:
        assert isinstance(source, str) and source.endswith(".onnx")
        assert onnx.load(source).graph.node
    assert model.SerializeToString() == before


def test_a_failed_write_names_the_users_path_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk or a folder without write permission, seen when the file is renamed into
    place: the error names the path the user gave, not the temporary one."""
    import errno
    import os

    from onnxobq.errors import UserError
    from onnxobq.files import write_atomically
    from onnxobq.graph.io import save_model

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src)

    monkeypatch.setattr(os, "replace", full)
    fix = "check the folder's permissions and the free disk space"
    with pytest.raises(UserError) as err:
        write_atomically(str(tmp_path / "r.json"), lambda f: f.write("{}"))
    assert str(err.value) == f"{tmp_path / 'r.json'}: cannot write it (No space left on device); {fix}"
    with pytest.raises(UserError) as err:
        save_model(builders.conv_stack(), str(tmp_path / "q.onnx"))
    assert str(err.value) == f"{tmp_path / 'q.onnx'}: cannot write it (No space left on device); {fix}"
    assert list(tmp_path.iterdir()) == []


def test_an_atomically_written_file_gets_the_mode_of_a_file_written_in_place(tmp_path):
    import os
    import stat

    from onnxobq.files import write_atomically
    write_atomically(str(tmp_path / "r.json"), lambda f: f.write("{}"))
    with open(tmp_path / "plain", "w") as f:
        f.write("{}")
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_a_full_temporary_folder_is_named_as_such(monkeypatch, tmp_path, capsys):
    """(was: "onnxruntime cannot run the model")"""
    import errno
    import tempfile
    onnx.save(builders.conv_stack(), tmp_path / "m.onnx")
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
    def full(model, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "_write_light_copy", full)
    code = main(["quantize", str(tmp_path / "m.onnx"), "--calib", "random", "-o", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"onnxobq: error: {tempfile.gettempdir()}: cannot write the temporary copy of the "
                                 "model that onnxruntime reads past 2 GB (No space left on device); free space there, "
                                 "or set TMPDIR to a folder with room\n")
    assert not (tmp_path / "q.onnx").exists()


def test_an_output_with_a_data_file_is_replaced_from_its_own_folder(monkeypatch, tmp_path, capsys):
    """Quantizing a model with external data again, with --overwrite, from the output's folder
    (was: "cannot write it (FileExistsError)", from onnx's check for a data file of that name in
    the working directory); the data file gets the model file's mode (onnx writes it 0600)."""
    onnx.save(builders.conv_stack(), tmp_path / "ext.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["quantize", "ext.onnx", "--method", "rtn", "-o", "q.onnx", "--overwrite", "-q"]) == 0, \
            capsys.readouterr().err
    assert (tmp_path / "q.onnx.data").exists()
    assert (tmp_path / "q.onnx.data").stat().st_mode & 0o777 == (tmp_path / "q.onnx").stat().st_mode & 0o777
