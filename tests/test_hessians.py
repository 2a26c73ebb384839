"""Saved Hessians: a run from --hessians equals a run that captures, and a wrong file is refused."""
import json
import numpy as np
import onnx
import pytest

from onnxobq.cli import main

import builders


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def stack(tmp_path):
    path = tmp_path / "stack.onnx"
    onnx.save(builders.conv_stack(), path)
    x = np.random.default_rng(0).standard_normal((16, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return path, tmp_path / "calib.npz"


def weights(path):
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


@pytest.mark.parametrize("method", ["fastobq", "obq"])
def test_saved_hessians_give_the_same_model(capsys, stack, method):
    model, calib = stack
    tmp = model.parent
    code, _, err = cli(capsys, "quantize", model, "--bits", 3, "--method", method, "--calib", calib,
                       "-o", tmp / "captured.onnx", "--save-hessians", tmp / "h.npz", "-q")
    assert code == 0, err
    # Another bit width from the same file: the Hessians do not depend on it.
    for bits in (3, 5):
        code, _, err = cli(capsys, "quantize", model, "--bits", bits, "--method", method, "--calib", calib,
                           "-o", tmp / f"loaded{bits}.onnx", "--hessians", tmp / "h.npz", "-q")
        assert code == 0, err
    code, _, err = cli(capsys, "quantize", model, "--bits", 5, "--method", method, "--calib", calib,
                       "-o", tmp / "captured5.onnx", "-q")
    assert code == 0, err
    for captured, loaded in (("captured.onnx", "loaded3.onnx"), ("captured5.onnx", "loaded5.onnx")):
        a, b = weights(tmp / captured), weights(tmp / loaded)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_wrong_hessian_files_are_refused(capsys, stack, tmp_path):
    model, calib = stack
    code, _, err = cli(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "a.onnx",
                       "--save-hessians", tmp_path / "h.npz", "--exclude", "dw", "-q")
    assert code == 0, err
    other = tmp_path / "other.onnx"
    onnx.save(builders.conv_stack(seed=1), other)
    other_calib = tmp_path / "other.npz"
    np.savez(other_calib, x=np.zeros((4, 3, 12, 12), np.float32))
    h = tmp_path / "h.npz"
    again = "capture them again with --save-hessians"
    cases = [
        ((other, "--calib", calib, "--hessians", h),
         f"--hessians {h}: captured from another model (stack.onnx), not {other}; {again}"),
        ((model, "--calib", other_calib, "--hessians", h),
         f"--hessians {h}: captured with other calibration settings (--calib {calib}, 16 samples); "
         f"give the same --calib options, or {again}"),
        ((model, "--calib", calib, "--hessians", h),
         f"--hessians {h}: has no Hessian for layer dw (saved with other --exclude or --op-types?); {again}"),
        ((model, "--calib", calib, "--hessians", calib),
         f"--hessians {calib}: not a Hessian file of this onnxobq version; {again}"),
        ((model, "--calib", calib, "--hessians", tmp_path / "none.npz"),
         f"--hessians {tmp_path / 'none.npz'}: no such file; give a file written by --save-hessians"),
        ((model, "--hessians", h, "--exclude", "dw"),
         f"--hessians {h}: BatchNorm re-estimation still needs the calibration data; "
         "give the --calib options the Hessians were saved with, or --no-bn-reestimate"),
        ((model, "--save-hessians", tmp_path / "x.npz", "--method", "rtn"),
         f"--save-hessians {tmp_path / 'x.npz'}: there are no Hessians to save without calibration data; "
         "give --calib FOLDER|FILE"),
        ((model, "--calib", calib, "--hessians", h, "--save-hessians", tmp_path / "x.npz"),
         f"--save-hessians {tmp_path / 'x.npz'}: the Hessians come from --hessians {h} already; give one of the two"),
    ]
    for args, message in cases:
        out = tmp_path / "out.onnx"
        code, _, err = cli(capsys, "quantize", *args, "-o", out, "-q")
        assert (code, err.strip()) == (2, f"onnxobq: error: {message}")
        assert not out.exists()
    assert not (tmp_path / "x.npz").exists()


def test_the_calibration_description_leaves_out_the_bn_pick():
    """Files saved before CalibConfig.pick existed describe the same settings."""
    from onnxobq.calibration import CalibConfig
    from onnxobq.calibration import describe as calib_description
    d = calib_description(CalibConfig(source="random", samples=4, pick=(0, 2)))
    assert "pick" not in d and d == calib_description(CalibConfig(source="random", samples=4))


def test_a_damaged_hessian_file_is_refused_in_one_line(capsys, stack, tmp_path):
    """A file with a good header whose arrays are missing, misshapen or not floats."""
    model, calib = stack
    h = tmp_path / "h.npz"
    assert cli(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "a.onnx", "--save-hessians", h,
               "-q")[0] == 0
    good = dict(np.load(h))
    conv1 = "the Hessian of layer conv1 is missing or not 1 x 27 x 27 floats"
    damaged = {"no_h0": ({k: v for k, v in good.items() if k != "h0"}, conv1),
               "flat_h0": ({**good, "h0": good["h0"][0]}, conv1),
               "int_h0": ({**good, "h0": good["h0"].astype(np.int32)}, conv1),
               "vector_rows": ({**good, "rows0": np.array([1, 2])}, conv1)}
    for name, (arrays, why) in damaged.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        out = tmp_path / "out.onnx"
        code, _, err = cli(capsys, "quantize", model, "--calib", calib, "--hessians", tmp_path / f"{name}.npz",
                           "-o", out, "-q")
        assert (code, err.strip()) == (2, f"onnxobq: error: --hessians {tmp_path / name}.npz: damaged ({why}); "
                                          "capture them again with --save-hessians"), name
        assert not out.exists()
    header = json.loads(str(good["header"]))
    del header["keys"]
    np.savez(tmp_path / "nokeys.npz", **{**good, "header": np.array(json.dumps(header))})
    code, _, err = cli(capsys, "quantize", model, "--calib", calib, "--hessians", tmp_path / "nokeys.npz",
                       "-o", tmp_path / "out.onnx", "-q")
    assert (code, err.strip()) == (2, f"onnxobq: error: --hessians {tmp_path / 'nokeys.npz'}: not a Hessian file "
                                      "of this onnxobq version; capture them again with --save-hessians")
