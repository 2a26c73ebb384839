"""Bad inputs: one line on stderr naming the input and the fix, exit status 2, nothing written.

Every case runs the CLI in-process in a scratch folder and checks, besides the message,
that the folder holds exactly the files it held before, byte for byte: no output model,
no ``.onnxobq-*`` temporary left behind, and the input model untouched.
"""
import json
import sys
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxobq.backend import cupy_or_none
from onnxobq.cli import main

import builders

PREFIX = "onnxobq: error: "


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_error(capsys, folder, args, names, fix):
    """Run ``onnxobq *args`` and check the one-line error; return it."""
    before = snapshot(folder)
    code, out, err = cli(capsys, *args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(PREFIX), line
    for name in names:
        assert str(name) in line, (name, line)
    assert fix in line, (fix, line)
    after = snapshot(folder)
    assert not [p for p in after if ".onnxobq-" in str(p)], after
    assert set(after) == set(before), set(after) ^ set(before)
    assert after == before  # the input model and every other file are byte-identical
    return line


def matmul_model(weight="initializer"):
    """x(N,4) @ W(4,3) -> y, with W an initializer, a graph input, or computed by a Transpose of a
    graph input (a Transpose of a constant would be folded)."""
    w = builders.rng(1).standard_normal((4, 3)).astype(np.float32)
    inputs, inits, nodes = [builders.fvi("x", [None, 4])], [], []
    if weight == "initializer":
        inits = [numpy_helper.from_array(w, "w")]
    elif weight == "input":
        inputs.append(builders.fvi("w", [4, 3]))
    else:
        inputs.append(builders.fvi("wt", [3, 4]))
        nodes.append(helper.make_node("Transpose", ["wt"], ["w"], name="t", perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"))
    return builders.make_model(nodes, inputs, [builders.fvi("y", [None, 3])], inits)


def two_input_model():
    """x(N,4) @ W(4,3) + z(N,3) -> y."""
    w = builders.rng(2).standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("Add", ["a", "z"], ["y"], name="add")]
    return builders.make_model(nodes, [builders.fvi("x", [None, 4]), builders.fvi("z", [None, 3])],
                               [builders.fvi("y", [None, 3])], [numpy_helper.from_array(w, "w")])


def dynamic_hw_model():
    m = builders.conv_stack()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    return m


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A scratch folder (also the working directory) with a conv model and good calibration data."""
    monkeypatch.chdir(tmp_path)
    onnx.save(builders.conv_stack(), tmp_path / "m.onnx")
    np.savez(tmp_path / "good.npz", x=builders.rng(3).standard_normal((4, 3, 12, 12)).astype(np.float32))
    return tmp_path


# ----------------------------------------------------------------------------- the model file

def test_missing_model(capsys, work):
    expect_error(capsys, work, ["quantize", "nope.onnx", "--method", "rtn", "-o", "q.onnx"],
                 names=["nope.onnx"], fix="give the path of an exported .onnx model")


def test_model_is_a_folder(capsys, work):
    (work / "dir.onnx").mkdir()
    expect_error(capsys, work, ["quantize", "dir.onnx", "--method", "rtn", "-o", "q.onnx"],
                 names=["dir.onnx", "folder"], fix="give the path of the .onnx file")


@pytest.mark.parametrize("kind", ["random-bytes", "text", "npz", "zero-bytes"])
def test_not_an_onnx_file(capsys, work, kind):
    path = work / f"{kind}.onnx"
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "npz":
        np.savez(work / "a.npz", x=np.zeros(3))
        path.write_bytes((work / "a.npz").read_bytes())
    else:
        path.write_bytes(b"")
    expect_error(capsys, work, ["quantize", path.name, "--method", "rtn", "-o", "q.onnx"],
                 names=[path.name], fix="export the model to ONNX again")


def test_empty_protobuf(capsys, work):
    onnx.save(onnx.ModelProto(), work / "empty.onnx")
    line = expect_error(capsys, work, ["quantize", "empty.onnx", "--method", "rtn", "-o", "q.onnx"],
                        names=["empty.onnx"], fix="export the model to ONNX again")
    assert "no graph" in line


def test_inspect_a_corrupt_model(capsys, work):
    (work / "bad.onnx").write_bytes(np.random.default_rng(1).bytes(300))
    expect_error(capsys, work, ["inspect", "bad.onnx"], names=["bad.onnx"], fix="export the model to ONNX again")


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("bits", [1, 9])
def test_unsupported_bits(capsys, work, bits):
    expect_error(capsys, work, ["quantize", "m.onnx", "--bits", bits, "--method", "rtn", "-o", "q.onnx"],
                 names=["--bits", str(bits)], fix="2<=x<=8")


def test_bad_size_option(capsys, work):
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "good.npz", "--size", "0x12", "-o", "q.onnx"],
                 names=["--size", "0x12"], fix="give a positive HxW")


@pytest.mark.parametrize("calib,options,names,fix", [
    ("good.npz", ["--mean", "0.5"], ["--calib good.npz", "holds arrays, fed as they were saved", "--mean"],
     "drop --mean"),
    ("random", ["--preset", "imagenet", "--size", "12x12"], ["--calib random", "draws random tensors"],
     "drop --preset, --size"),
    ("good.npz", ["--input-shape", "x=1x3x12x12"], ["--calib good.npz", "--input-shape sizes the tensors of "
     "--calib random"], "drop --input-shape"),
])
def test_an_option_for_another_kind_of_source(capsys, work, calib, options, names, fix):
    """Image options with arrays or random tensors, and --input-shape with files, would go unused."""
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", calib, *options, "-o", "q.onnx"],
                 names=names, fix=fix)




@pytest.mark.parametrize("flag,source", [("--calib", "good.npz"), ("--calib", "imgs"), ("--hessians", "h.npz")])
def test_unreadable_input_file(capsys, work, monkeypatch, flag, source):
    """A file onnxobq may not read is named with the reason, not taken for a bad format (tests run
    as root here, where chmod does not stop a read, so the reader is made to fail as it would)."""
    from PIL import Image

    def denied(real, name):
        def read(path, *args, **kwargs):
            if str(path).endswith(name):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)
        return read

    if source == "imgs":
        image_folder(work)
        monkeypatch.setattr(Image, "open", denied(Image.open, "a.png"))
        path = "imgs/a.png"
    else:
        (work / "h.npz").write_bytes(b"")
        monkeypatch.setattr(np, "load", denied(np.load, source))
        path = source
    args = ["--calib", "good.npz", "--hessians", "h.npz"] if flag == "--hessians" else ["--calib", source]
    expect_error(capsys, work, ["quantize", "m.onnx", *args, "-o", "q.onnx"],
                 names=[f"{flag} {path}", "cannot read it (Permission denied)"],
                 fix="make it readable or give another file")

def test_unreadable_model(capsys, work, monkeypatch):
    """The model file goes through the same message (as root a chmod does not stop the read)."""
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(onnx, "load", denied)
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", "q.onnx"],
                 names=["m.onnx: cannot read it (Permission denied)"], fix="make it readable or give another file")

def test_nan_in_calibration_arrays(capsys, work):
    """NaN samples (was: every layer rounded to nearest, said only in a note that -q hides)."""
    a = builders.rng(4).standard_normal((5, 3, 12, 12)).astype(np.float32)
    a[1, 0, 2, 2] = a[3, 2, 0, 0] = np.nan
    np.savez(work / "nan.npz", x=a)
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "nan.npz", "-o", "q.onnx", "-q"],
                 names=["--calib nan.npz", "input 'x' holds NaN in 2 of its 5 samples (the first at index 1)"],
                 fix="replace or drop those samples")


@pytest.mark.parametrize("command", ["quantize", "compare"])
def test_calibration_arrays_with_no_samples(capsys, work, command):
    """(was: a ValueError traceback from a reshape)"""
    np.savez(work / "none.npz", x=np.zeros((0, 3, 12, 12), np.float32))
    args = ["m.onnx", "-o", "q.onnx"] if command == "quantize" else ["m.onnx", "m.onnx"]
    expect_error(capsys, work, [command, *args, "--calib", "none.npz"],
                 names=["--calib none.npz", "input 'x' has no samples (an array of shape [0, 3, 12, 12])"],
                 fix="give at least one sample")


def test_inputs_with_different_numbers_of_samples(capsys, work):
    """(was: "5 calibration samples", or an error inside onnxruntime naming neither file nor cause)"""
    onnx.save(two_input_model(), work / "two.onnx")
    r = builders.rng(5)
    np.savez(work / "uneven.npz", x=r.standard_normal((5, 4)).astype(np.float32),
             z=r.standard_normal((3, 3)).astype(np.float32))
    expect_error(capsys, work, ["quantize", "two.onnx", "--calib", "uneven.npz", "-o", "q.onnx"],
                 names=["--calib uneven.npz", "the inputs have different numbers of samples ('x' 5, 'z' 3)"],
                 fix="give every input the same samples")


def test_infinite_calibration_values_are_fed(capsys, work):
    """Infinities can be meant (an additive attention mask of -inf): the run goes on."""
    a = builders.rng(4).standard_normal((4, 3, 12, 12)).astype(np.float32)
    a[0, 0, 0, 0] = -np.inf
    np.savez(work / "inf.npz", x=a)
    code, out, err = cli(capsys, "quantize", "m.onnx", "--calib", "inf.npz", "--no-bn-reestimate", "-o", "q.onnx")
    assert code == 0, err
    assert "NaN or Inf in its calibration inputs: rounded to nearest" in out

def image_folder(work, name="imgs"):
    from PIL import Image
    (work / name).mkdir()
    Image.new("RGB", (12, 12), (200, 100, 50)).save(work / name / "a.png")
    return name


@pytest.mark.parametrize("options,names,fix", [
    (["--std", "nan"], ["--std", "'nan'"], "give comma-separated finite numbers"),
    (["--mean", "0.5,inf,0.5"], ["--mean", "'0.5,inf,0.5'"], "give comma-separated finite numbers"),
    (["--scale", "0"], ["--scale", "'0'"], "is not a finite number other than 0"),
    (["--scale", "nan"], ["--scale", "'nan'"], "is not a finite number other than 0"),
    (["--resize", "letterbox", "--pad-value", "inf"], ["--pad-value", "'inf'"], "is not a finite number"),
])
def test_image_values_that_are_not_finite(capsys, work, options, names, fix):
    """NaN or inf in the pre-processing would make every calibration sample NaN (the run went on
    and rounded every layer to nearest), and a scale of 0 every sample 0."""
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", image_folder(work), *options, "-o", "q.onnx"],
                 names=names, fix=fix)


@pytest.mark.parametrize("options,flag,resize,used", [
    (["--crop-fraction", "0.5"], "--crop-fraction", "crop", "stretch"),
    (["--resize", "letterbox", "--crop-fraction", "0.5"], "--crop-fraction", "crop", "letterbox"),
    (["--pad-value", "114"], "--pad-value", "letterbox", "stretch"),
    (["--preset", "imagenet", "--pad-align", "topleft"], "--pad-align", "letterbox", "crop"),
])
def test_an_option_for_another_resize_mode(capsys, work, options, flag, resize, used):
    """--crop-fraction without crop, or letterbox padding without letterbox, would go unused."""
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", image_folder(work), *options, "-o", "q.onnx"],
                 names=[flag, f"applies to --resize {resize} only", f"resized by {used}"],
                 fix=f"add --resize {resize} or drop {flag}")


def test_preset_letterbox_takes_the_padding_options(capsys, work):
    code, out, err = cli(capsys, "quantize", "m.onnx", "--calib", image_folder(work), "--preset", "yolo",
                         "--pad-value", "0", "--pad-align", "topleft", "-o", "q.onnx", "-q")
    assert code == 0 and err == "", err
    assert (work / "q.onnx").exists()


def test_qdq_below_opset_13(capsys, work):
    onnx.save(builders.conv_stack(opset=11), work / "m11.onnx")
    expect_error(capsys, work, ["quantize", "m11.onnx", "--method", "rtn", "--opset", "12", "-o", "q.onnx"],
                 names=["--opset 12", "QDQ weights need opset 13"], fix="give --opset 13 or later, or --format fake")


@pytest.mark.parametrize("source,options,fix", [
    ("imgs", ["--size", "100000x100000"], "give a smaller --size, or a smaller --batch-size"),
    ("random", ["--input-shape", "x=1x3x100000x100000"], "give smaller --input-shape sizes, or a smaller --batch-size"),
])
def test_samples_too_large_for_the_machine(capsys, work, source, options, fix):
    """A batch of over a quarter of the machine's memory is refused before anything is drawn or
    decoded (the OOM killer ended such a run with no message)."""
    onnx.save(dynamic_hw_model(), work / "hw.onnx")
    if source == "imgs":
        image_folder(work)
    line = expect_error(capsys, work, ["quantize", "hw.onnx", "--calib", source, *options, "-o", "q.onnx"],
                        names=[f"--calib {source}", "a batch of 8 samples takes 894.1 GiB",
                               "over a quarter of this machine's"], fix=fix)
    assert "GiB; " in line

@pytest.mark.parametrize("method", ["fastobq", "gptq"])
def test_hessian_method_without_calibration(capsys, work, method):
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", method, "-o", "q.onnx"],
                 names=[f"--method {method}"], fix="give --calib")


@pytest.mark.skipif(cupy_or_none() is not None, reason="this machine has a GPU")
def test_device_cuda_without_gpu(capsys, work):
    expect_error(capsys, work, ["quantize", "m.onnx", "--device", "cuda", "--calib", "good.npz", "-o", "q.onnx"],
                 names=["--device cuda"], fix="use --device cpu")


def test_compare_needs_calibration(capsys, work):
    expect_error(capsys, work, ["compare", "m.onnx", "m.onnx"], names=["--calib"], fix="--calib random")


def test_compare_missing_quantized_model(capsys, work):
    expect_error(capsys, work, ["compare", "m.onnx", "q.onnx", "--calib", "good.npz"],
                 names=["q.onnx"], fix="give the path")


# ----------------------------------------------------------------------------- output paths

@pytest.mark.parametrize("spelling", ["m.onnx", "./sub/../m.onnx", "{abs}/m.onnx"])
def test_output_is_the_input(capsys, work, spelling):
    (work / "sub").mkdir()
    out = spelling.format(abs=work)
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", out],
                 names=[f"--output {out}", "input model"], fix="give another output path")


def test_output_is_the_input_from_another_folder(capsys, work):
    (work / "d").mkdir()
    onnx.save(builders.conv_stack(), work / "d" / "m.onnx")
    expect_error(capsys, work, ["quantize", "d/m.onnx", "--method", "rtn", "-o", "./d/../d/m.onnx"],
                 names=["./d/../d/m.onnx"], fix="give another output path")


@pytest.mark.parametrize("out", ["w.data", "w"])
def test_output_would_overwrite_the_inputs_external_data(capsys, work, out):
    """Writing w.data (or w, whose weights go to w.data) would clobber the input's weights."""
    onnx.save_model(builders.conv_stack(), work / "ext.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    expect_error(capsys, work, ["quantize", "ext.onnx", "--method", "rtn", "-o", out],
                 names=[f"--output {out}", "w.data"], fix="give another output path")


def test_output_folder_missing(capsys, work):
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", "no/q.onnx"],
                 names=["no/q.onnx"], fix="create it first")


@pytest.mark.parametrize("report", ["m.onnx", "q.onnx"])
def test_report_would_overwrite_a_model(capsys, work, report):
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", "q.onnx", "--report", report],
                 names=["--report", report], fix="give another file")


@pytest.mark.parametrize("args,names,fix", [
    (["-o", "good.npz"], ["--output", "good.npz: this is the --calib file"], "give another path"),
    (["-o", "q.onnx", "--report", "good.npz"], ["--report", "good.npz: this is the --calib file"], "give another path"),
    (["-o", "q.onnx", "--save-hessians", "./good.npz"], ["--save-hessians", "this is the --calib file"],
     "give another path"),
    (["-o", "q.onnx", "--report", "s.npz", "--save-hessians", "s.npz"],
     ["--save-hessians", "s.npz: --report writes there too"], "give two different files"),
])
def test_an_output_that_would_overwrite_another_input(capsys, work, args, names, fix):
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "good.npz", *args], names=names, fix=fix)


def test_a_report_that_cannot_be_written_leaves_no_model(capsys, work, monkeypatch):
    """The report is written after the model; when it fails (a full disk), the model goes too."""
    from onnxobq import pipeline
    from onnxobq.errors import UserError

    def full(report, path):
        raise UserError(f"{path}: cannot write it (No space left on device); check the folder's permissions "
                        "and the free disk space")

    monkeypatch.setattr(pipeline, "write_json", full)
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", "q.onnx", "--report", "r.json"],
                 names=["r.json: cannot write it"], fix="the free disk space")


@pytest.mark.parametrize("damp", ["nan", "inf", "0", "-1", "x"])
def test_damp_must_be_a_finite_number_above_zero(capsys, work, damp):
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "good.npz", "--damp", damp, "-o", "q.onnx"],
                 names=["--damp", f"'{damp}'"], fix="is not a" + (" number" if damp == "x" else " finite number above 0"))


@pytest.mark.parametrize("value,fix", [("conv1", "give GLOB=BITS, e.g. 'conv1=8'"), ("=4", "give GLOB=BITS"),
                                       ("conv1=9", "the bit width must be a whole number from 2 to 8"),
                                       ("conv1=x", "the bit width must be a whole number from 2 to 8"),
                                       ("conv1=\u00b2", "the bit width must be a whole number from 2 to 8")])
def test_layer_bits_need_a_glob_and_a_width(capsys, work, value, fix):
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "good.npz", "--layer-bits", value, "-o", "q.onnx"],
                 names=["--layer-bits", f"'{value}'"], fix=fix)


def test_image_options_with_a_folder_of_arrays_and_images_say_which_is_read(capsys, work):
    (work / "mixed").mkdir()
    np.save(work / "mixed" / "a.npy", np.zeros((2, 3, 12, 12), np.float32))
    from PIL import Image
    Image.new("RGB", (12, 12)).save(work / "mixed" / "b.png")
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "mixed", "--mean", "0.5", "-o", "q.onnx"],
                 names=["--calib mixed", "the folder's .npy/.npz files are read, not its images"],
                 fix="move the arrays out to calibrate on the images, or drop --mean to use the arrays")


def test_options_for_another_source_fail_before_a_hessians_solve(capsys, work, monkeypatch):
    from onnxobq import pipeline
    assert main(["quantize", "m.onnx", "--calib", "good.npz", "--save-hessians", "h.npz", "-o", "a.onnx", "-q"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(pipeline, "from_file", lambda *a: pytest.fail("loaded the Hessians first"))
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "good.npz", "--hessians", "h.npz", "--size", "12x12",
                                "-o", "q.onnx"], names=["--calib good.npz", "--size apply to image folders"],
                 fix="drop --size")


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_an_output_that_is_a_pipe_is_refused(capsys, work, option):
    """The atomic rename would replace the pipe (or, as root, a device such as /dev/null)."""
    import os
    os.mkfifo(work / "pipe")
    args = ["-o", "pipe"] if option == "-o" else ["-o", "q.onnx", "--report", "pipe"]
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", *args],
                 names=["pipe: is not a regular file"], fix="give a file name")
    assert not (work / "pipe").is_file()


def test_compare_with_a_model_of_other_inputs(capsys, work):
    m = builders.conv_stack(batch=1)
    onnx.save(m, work / "one.onnx")
    expect_error(capsys, work, ["compare", "m.onnx", "one.onnx", "--calib", "good.npz"],
                 names=["one.onnx: its inputs (x [1, 3, 12, 12] float32) are not those of m.onnx "
                        "(x [?, 3, 12, 12] float32)"], fix="compare a model with its own quantized version")


def test_report_folder_missing(capsys, work):
    """Used to write q.onnx, then die with a FileNotFoundError traceback on the report."""
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", "q.onnx",
                                "--report", "no/r.json"],
                 names=["--report", "no/r.json"], fix="create it first")


# ----------------------------------------------------------------------------- layers

def test_no_quantizable_layer(capsys, work):
    relu = builders.make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                               [builders.fvi("x", [1, 4])], [builders.fvi("y", [1, 4])])
    onnx.save(relu, work / "relu.onnx")
    expect_error(capsys, work, ["quantize", "relu.onnx", "--method", "rtn", "-o", "q.onnx"],
                 names=["relu.onnx", "no quantizable Conv, Gemm or MatMul layer"], fix="this model has none")


def test_exclude_of_every_layer_says_to_narrow_it(capsys, work):
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", "q.onnx", "--exclude", "*"],
                 names=["m.onnx", "no quantizable Conv, Gemm or MatMul layer", "excluded by --exclude *"],
                 fix="give --exclude patterns that leave some layers")


def test_op_types_that_the_model_lacks_name_what_it_has(capsys, work):
    onnx.save(builders.conv_stack(), work / "m.onnx")
    line = expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", "q.onnx", "--op-types", "MatMul"],
                        names=["m.onnx"], fix="give --op-types with an op the model has")
    assert line == (f"{PREFIX}m.onnx: no layer of --op-types MatMul to quantize (it has 3 Conv, 1 Gemm); "
                    "give --op-types with an op the model has")


@pytest.mark.parametrize("value,bad", [("Relu", ""), ("Conv,Relu,conv", "Relu, conv is not an op onnxobq quantizes; "),
                                       (",", "")])
def test_an_unknown_op_type_is_one_line(capsys, work, value, bad):
    line = expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", "q.onnx", "--op-types", value],
                        names=["--op-types", repr(value)], fix="give a comma-separated list of Conv, Gemm, MatMul")
    assert line.endswith(f"{value!r}: {bad}give a comma-separated list of Conv, Gemm, MatMul")


def test_op_types_and_exclude_that_leave_nothing_name_both(capsys, work):
    line = expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", "q.onnx", "--op-types", "Gemm",
                                       "--exclude", "fc"], names=["m.onnx"], fix="")
    assert line == (f"{PREFIX}m.onnx: no quantizable Conv, Gemm or MatMul layer (fc: excluded by --exclude fc; "
                    "3 not in --op-types Gemm), 1 excluded by --exclude; give --exclude patterns and --op-types "
                    "that leave some layers")


@pytest.mark.parametrize("weight,reason", [("input", "the weight is a graph input"),
                                           ("transpose", "the weight is computed at run time (by a Transpose node)")])
def test_only_matmul_has_a_runtime_weight(capsys, work, weight, reason):
    onnx.save(matmul_model(weight), work / "mm.onnx")
    expect_error(capsys, work, ["quantize", "mm.onnx", "--calib", "random", "-o", "q.onnx"],
                 names=["mm.onnx", "mm: " + reason], fix="this model has none")


def test_nan_weights_skip_that_layer_and_say_why(capsys, work):
    m = builders.conv_stack()
    wg = next(t for t in m.graph.initializer if t.name == "wg")
    a = numpy_helper.to_array(wg).copy()
    a[2, 3] = np.nan
    wg.CopyFrom(numpy_helper.from_array(a, "wg"))
    onnx.save(m, work / "nan.onnx")
    code, out, err = cli(capsys, "quantize", "nan.onnx", "--calib", "good.npz", "--no-bn-reestimate",
                         "-o", "q.onnx", "--report", "r.json")
    assert code == 0, err
    assert "skipped: fc (Gemm): the weight has NaN or Inf values" in out
    assert "quantized 3 layers, left 1 in float" in out
    report = json.loads((work / "r.json").read_text())
    assert [l["name"] for l in report["layers"]] == ["conv1", "dw", "grouped"]
    assert report["skipped"] == [{"name": "fc", "op": "Gemm", "weight": "wg",
                                  "reason": "the weight has NaN or Inf values"}]
    q = onnx.load(work / "q.onnx")
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) == 3
    kept = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == "wg"))
    np.testing.assert_array_equal(kept, a)  # left in float, NaN and all


def test_nan_layer_upstream_gives_downstream_layers_the_right_note(capsys, work):
    """A NaN weight left in float early on poisons every later layer's calibration inputs."""
    m = builders.conv_stack()
    w1 = next(t for t in m.graph.initializer if t.name == "w1")
    a = numpy_helper.to_array(w1).copy()
    a[0, 0, 0, 0] = np.inf
    w1.CopyFrom(numpy_helper.from_array(a, "w1"))
    onnx.save(m, work / "inf.onnx")
    code, out, err = cli(capsys, "quantize", "inf.onnx", "--calib", "good.npz", "-o", "q.onnx")
    assert code == 0, err
    assert "skipped: conv1 (Conv): the weight has NaN or Inf values" in out
    assert ("note: 3 layers (dw, grouped, fc), each: NaN or Inf in its calibration inputs: rounded to nearest; "
            "check the calibration data and the layers before it") in out
    assert "raise --damp" not in out
    assert "BN: skipped: the model's outputs are not finite on the calibration data" in out


# ----------------------------------------------------------------------------- calibration data

def test_npz_with_the_wrong_input_name(capsys, work):
    np.savez(work / "c.npz", image=np.zeros((2, 3, 12, 12), np.float32))
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "c.npz", "-o", "q.onnx"],
                 names=["--calib c.npz", "'image'", "'x'"], fix="name the .npz arrays after the inputs")


@pytest.mark.parametrize("shape,detail", [
    ((2, 3, 12), "read as one sample, its axis 0 is 2 where the input needs 3"),        # rank
    ((2, 3, 12, 12, 1), "got an array of shape [2, 3, 12, 12, 1]"),                     # rank
    ((2, 3, 11, 12), "read as a batch, its axis 2 is 11 where the input needs 12"),     # a fixed dim
    ((3, 12, 10), "read as one sample, its axis 2 is 10 where the input needs 12"),    # a fixed dim
])
def test_npz_with_the_wrong_shape(capsys, work, shape, detail):
    np.savez(work / "c.npz", x=np.zeros(shape, np.float32))
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "c.npz", "-o", "q.onnx"],
                 names=["--calib c.npz", "input 'x'", "[?, 3, 12, 12]", detail], fix="save arrays of that shape")


def test_npz_with_the_wrong_dtype(capsys, work):
    np.savez(work / "c.npz", x=np.zeros((2, 3, 12, 12), np.int64))
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "c.npz", "-o", "q.onnx"],
                 names=["--calib c.npz", "input 'x'", "int64"], fix="save the array as float32")


def test_npy_for_a_two_input_model(capsys, work):
    onnx.save(two_input_model(), work / "two.onnx")
    np.save(work / "c.npy", np.zeros((2, 4), np.float32))
    expect_error(capsys, work, ["quantize", "two.onnx", "--calib", "c.npy", "-o", "q.onnx"],
                 names=["--calib c.npy", "x, z"], fix="use .npz files keyed by input name")


def test_corrupt_npz(capsys, work):
    (work / "c.npz").write_bytes(b"PK\x03\x04 broken")
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "c.npz", "-o", "q.onnx"],
                 names=["--calib c.npz"], fix="give .npy/.npz files saved with numpy")


def test_calib_path_missing(capsys, work):
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "nowhere", "-o", "q.onnx"],
                 names=["--calib nowhere", "no such file or folder"], fix="give a folder of images")


def test_calib_file_of_another_kind(capsys, work):
    (work / "c.txt").write_text("1 2 3")
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "c.txt", "-o", "q.onnx"],
                 names=["--calib c.txt"], fix="give a folder of images")


@pytest.mark.parametrize("files", [[], ["notes.txt", "labels.csv"]])
def test_folder_without_images_or_arrays(capsys, work, files):
    (work / "calib").mkdir()
    for f in files:
        (work / "calib" / f).write_text("x")
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "calib", "-o", "q.onnx"],
                 names=["--calib calib", "no .jpg/.png/.bmp images"], fix="add calibration data or use --calib random")


def test_corrupt_image(capsys, work):
    (work / "imgs").mkdir()
    (work / "imgs" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "imgs", "-o", "q.onnx"],
                 names=["a.jpg", "cannot decode"], fix="remove or replace the file")


def test_mean_that_does_not_fit_a_grayscale_model(capsys, work):
    from PIL import Image
    gray = builders.make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [builders.fvi("x", [1, 1, 4, 4])],
        [builders.fvi("y", [1, 2, 4, 4])], [numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")])
    onnx.save(gray, work / "gray.onnx")
    (work / "imgs").mkdir()
    Image.new("L", (4, 4), 7).save(work / "imgs" / "a.png")
    expect_error(capsys, work, ["quantize", "gray.onnx", "--calib", "imgs", "--preset", "imagenet", "-o", "q.onnx"],
                 names=["--mean 0.485,0.456,0.406", "input 'x' has 1 channel"], fix="give 1 value")


def test_fixed_batch_larger_than_the_samples(capsys, work):
    onnx.save(builders.conv_stack(batch=4), work / "b4.onnx")
    expect_error(capsys, work, ["quantize", "b4.onnx", "--calib", "good.npz", "--samples", 3, "-o", "q.onnx"],
                 names=["--calib good.npz", "no calibration samples"], fix="give more samples")


def test_random_with_dynamic_dims_and_no_input_shape(capsys, work):
    onnx.save(dynamic_hw_model(), work / "dyn.onnx")
    expect_error(capsys, work, ["quantize", "dyn.onnx", "--calib", "random", "-o", "q.onnx"],
                 names=["input 'x'", "[?, 3, ?, ?]"], fix="--input-shape x=1x3x?x?")


@pytest.mark.parametrize("shape,names,fix", [
    ("x=3x12", ["--input-shape x=3x12", "rank 4"], "give all 4 dimensions"),
    ("x=1x4x12x12", ["--input-shape x=1x4x12x12", "axis 1 must be 3"], "match the model's fixed dimensions"),
    ("img=1x3x12x12", ["--input-shape img=", "no input 'img'"], "its inputs are x"),
    ("x=1x3x12", ["--input-shape x=1x3x12", "read as one sample without the batch axis"], "give all 4 dimensions"),
    ("x=-1x3x12x12", ["--input-shape", "'x=-1x3x12x12'"], "give positive sizes, e.g. x=1x3x224x224"),
    ("x=1x3x0x12", ["--input-shape", "'x=1x3x0x12'"], "give positive sizes"),
])
def test_bad_input_shape(capsys, work, shape, names, fix):
    onnx.save(dynamic_hw_model(), work / "dyn.onnx")
    expect_error(capsys, work, ["quantize", "dyn.onnx", "--calib", "random", "--input-shape", shape,
                                "-o", "q.onnx"], names=names, fix=fix)


def test_error_during_capture_gets_its_own_line(capsys, work, monkeypatch):
    """On a terminal the calibration bar is up when the data turns out bad: it is cleared
    first, so the error is all that is left on the line."""
    np.savez(work / "c.npz", x=np.zeros((2, 3, 12, 12), np.int32))
    before = snapshot(work)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = cli(capsys, "quantize", "m.onnx", "--calib", "c.npz", "-o", "q.onnx")
    assert code == 2 and "calibration" in err  # the bar was drawn
    assert err.count("\n") == 1 and err.endswith("\n")
    shown = err.rstrip("\n").split("\r")[-1]  # what a terminal shows on the last line
    assert shown == PREFIX + "--calib c.npz: input 'x' needs float32, got int32; save the array as float32"
    assert snapshot(work) == before


def test_no_progress_bars_off_a_terminal(capsys, work):
    """stderr is not a terminal here: a successful run writes nothing there, and only its output."""
    before = snapshot(work)
    code, out, err = cli(capsys, "quantize", "m.onnx", "--calib", "good.npz", "-o", "q.onnx")
    assert code == 0 and err == "" and "wrote" in out
    after = snapshot(work)
    assert set(after) - set(before) == {work.joinpath("q.onnx").relative_to(work)}
    assert all(after[p] == before[p] for p in before)   # the input model is untouched


def test_compare_with_a_model_of_another_input_shape(capsys, work):
    """Caught before onnxruntime, whose rejection blamed the calibration data."""
    w = builders.rng(4).standard_normal((5, 3)).astype(np.float32)
    other = builders.make_model(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"], name="gap"),
         helper.make_node("Flatten", ["p"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "w"], ["y"], name="fc", transB=1)],
        [builders.fvi("x", [None, 3, 8, 8])], [builders.fvi("y", [None, 5])], [numpy_helper.from_array(w, "w")])
    onnx.save(other, work / "other.onnx")
    expect_error(capsys, work, ["compare", "m.onnx", "other.onnx", "--calib", "good.npz"],
                 names=["other.onnx: its inputs (x [?, 3, 8, 8] float32) are not those of m.onnx"],
                 fix="compare a model with its own quantized version")


# ----------------------------------------------------------------------------- what onnxruntime runs

def _at_opset(work, opset):
    m = builders.conv_stack()
    m.opset_import[0].version = opset
    onnx.save(m, work / f"op{opset}.onnx")
    return f"op{opset}.onnx"


def test_an_opset_past_onnxruntimes_qdq_nodes(capsys, work):
    """(was: exit 0 and a QDQ model that onnxruntime cannot load, "no DequantizeLinear(28)")"""
    from onnxobq.runtime import newest_opset
    opset = newest_opset(True) + 1
    if opset > newest_opset(False):
        pytest.skip("this onnxruntime runs QDQ at every opset it loads")
    name = _at_opset(work, opset)
    expect_error(capsys, work, ["quantize", name, "--method", "rtn", "-o", "q.onnx"],
                 names=[f"{name}: opset {opset} is newer than the installed onnxruntime",
                        f"runs QuantizeLinear and DequantizeLinear (up to {opset - 1})"],
                 fix="re-export the model at an older opset, or use --format fake, or install a newer onnxruntime")


@pytest.mark.parametrize("command", ["quantize", "compare"])
def test_an_opset_past_onnxruntime(capsys, work, command):
    """(was: a traceback with --method rtn)"""
    from onnxobq.runtime import newest_opset
    name = _at_opset(work, 40)
    args = ["--method", "rtn", "-o", "q.onnx"] if command == "quantize" else ["m.onnx", "--calib", "random"]
    expect_error(capsys, work, [command, name, *args],
                 names=[f"{name}: opset 40 is newer than the installed onnxruntime", f"runs (up to {newest_opset()})"],
                 fix="re-export the model at an older opset, or install a newer onnxruntime")


def test_an_explicit_opset_past_onnxruntimes_qdq_nodes(capsys, work):
    from onnxobq.runtime import newest_opset
    opset = newest_opset(True) + 1
    if opset > newest_opset(False):
        pytest.skip("this onnxruntime runs QDQ at every opset it loads")
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "--opset", opset, "-o", "q.onnx"],
                 names=[f"m.onnx: opset {opset} is newer"], fix=f"give --opset {opset - 1} or lower")


def test_blocked_matmul_weights_behind_quantized_inputs(capsys, work):
    """(was: exit 0 and a model whose MatMulIntegerToFloat fails in onnxruntime's default session)"""
    onnx.save(matmul_model(), work / "mm.onnx")
    expect_error(capsys, work, ["quantize", "mm.onnx", "--calib", "random", "--act-bits", "8", "--group-size", "2",
                                "-o", "q.onnx"],
                 names=["mm.onnx: --group-size with --act-bits 8 on MatMul mm: onnxruntime cannot run"],
                 fix="keep their inputs in float with --act-exclude, give them a scale per channel with "
                     "--layer-group-size GLOB=0, or use --format fake")


@pytest.mark.parametrize("options", [["--act-exclude", "mm"], ["--layer-group-size", "mm=0"], ["--format", "fake"]])
def test_each_way_out_of_blocked_matmuls_behind_quantized_inputs_runs(capsys, work, options):
    import onnxruntime as ort
    onnx.save(matmul_model(), work / "mm.onnx")
    code, _, err = cli(capsys, "quantize", "mm.onnx", "--calib", "random", "--act-bits", "8", "--group-size", "2",
                       "-o", "q.onnx", *options)
    assert code == 0, err
    y = ort.InferenceSession(str(work / "q.onnx")).run(None, {"x": np.ones((2, 4), np.float32)})[0]
    assert y.shape == (2, 3) and np.isfinite(y).all()


def test_a_written_model_that_onnxruntime_cannot_run_is_removed(capsys, work, monkeypatch):
    """Whatever the cause, a model that onnxruntime's default session cannot run is not left with
    exit 0: here the export is made to write a node of an op that does not exist."""
    from onnxobq import pipeline
    real = pipeline.build_model

    def broken(*a, **k):
        model = real(*a, **k)
        y = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = [f"{o}_" if o == y else o for o in node.output]
        model.graph.node.append(helper.make_node("NoSuchOp", [f"{y}_"], [y], domain="onnxobq.test"))
        model.opset_import.append(helper.make_opsetid("onnxobq.test", 1))
        return model

    monkeypatch.setattr(pipeline, "build_model", broken)
    expect_error(capsys, work, ["quantize", "m.onnx", "--calib", "good.npz", "-o", "q.onnx"],
                 names=["q.onnx does not run in onnxruntime", "with its default options", "NoSuchOp"],
                 fix="nothing was written")


def test_compare_of_models_without_float_outputs(capsys, work):
    """(was: an empty table and exit 0)"""
    m = builders.conv_stack()
    m.graph.node.append(helper.make_node("ArgMax", ["y"], ["label"], axis=1))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("label", onnx.TensorProto.INT64, [None, 1]))
    onnx.save(m, work / "argmax.onnx")
    expect_error(capsys, work, ["compare", "argmax.onnx", "argmax.onnx", "--calib", "random"],
                 names=["argmax.onnx: has no floating-point output to compare (its outputs: 'label' (int64))"],
                 fix="compare models whose outputs are floats, or measure your own metric on their outputs")


# ----------------------------------------------------------------------------- names that are not UTF-8

def _bad_name_model(work):
    data = bytearray(builders.conv_stack().SerializeToString())
    data[data.find(b"conv1")] = 0xFF       # the first Conv's node name
    (work / "badname.onnx").write_bytes(bytes(data))


@pytest.mark.parametrize("command", [["inspect", "badname.onnx"],
                                     ["quantize", "badname.onnx", "--method", "rtn", "-o", "q.onnx"],
                                     ["compare", "badname.onnx", "m.onnx", "--calib", "random"]])
def test_a_node_name_that_is_not_utf8(capsys, work, command):
    """(was: tracebacks from inspect's table and graphsurgeon's export)"""
    _bad_name_model(work)
    expect_error(capsys, work, command, names=["badname.onnx: the name '\\xffonv1' is not valid UTF-8"],
                 fix="export the model again with UTF-8 names")


def test_a_model_path_that_is_not_utf8(capsys, work):
    """(was: "fails onnx.checker", as its binding cannot take the path)"""
    import os
    name = os.fsdecode(b"\xffm.onnx")
    (work / name).write_bytes((work / "m.onnx").read_bytes())
    expect_error(capsys, work, ["quantize", name, "--method", "rtn", "-o", "q.onnx"],
                 names=["MODEL \\xffm.onnx: the path is not valid UTF-8"], fix="rename it with UTF-8 characters only")


def test_an_output_path_that_is_not_utf8(capsys, work):
    """(was: a TypeError traceback from onnx's checker)"""
    import os
    expect_error(capsys, work, ["quantize", "m.onnx", "--method", "rtn", "-o", os.fsdecode(b"\xffq.onnx")],
                 names=["\\xffq.onnx: the path is not valid UTF-8"], fix="rename it with UTF-8 characters only")


def test_weights_near_the_dtypes_largest_value_stay_in_float(capsys, work):
    """(was: Inf outputs and a NumPy overflow warning with an asymmetric grid)"""
    import onnxruntime as ort
    m = builders.conv_stack()
    for t in m.graph.initializer:
        if t.name == "wg":
            a = numpy_helper.to_array(t).copy()
            a[0, 0], a[0, 1] = 3.4e38, -3.4e38
            t.CopyFrom(numpy_helper.from_array(a, "wg"))
    onnx.save(m, work / "huge.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        code, out, err = cli(capsys, "quantize", "huge.onnx", "--calib", "random", "--asymmetric", "-o", "q.onnx")
    assert code == 0, err
    assert ("skipped: fc (Gemm): the weight has values up to 3.4e+38, which leave no room below float32's largest "
            "value for a scale and its rounding") in out
    x = builders.rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert np.isfinite(ort.InferenceSession(str(work / "q.onnx")).run(None, {"x": x})[0]).all()



def test_a_model_that_fails_inside_onnxruntime_is_one_line_on_stderr(capfd, work):
    """A Reshape that cannot hold the batch fails in onnxruntime's kernel (was: onnxruntime's own
    coloured log line on stderr too, and a message that blamed the data's shapes)."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")]
    model = builders.make_model(nodes, [builders.fvi("x", [None, 4])], [builders.fvi("y", [3])],
                                [numpy_helper.from_array(np.array([3], np.int64), "shape")])
    onnx.save(model, work / "reshape.onnx")
    code = main(["compare", "reshape.onnx", "reshape.onnx", "--calib", "random"])
    out, err = capfd.readouterr()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("onnxobq: error: onnxruntime failed inside the model on a calibration batch that fits its "
                          "inputs (")
    assert err.endswith("); check that the model runs in onnxruntime on this data\n")
