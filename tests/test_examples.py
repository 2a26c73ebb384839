"""The examples and the README's two commands run as written, so the documentation cannot rot."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("[0-9][0-9]_*.py"))


def run_example(path: Path, out: Path) -> str:
    done = subprocess.run([sys.executable, str(path), str(out)], capture_output=True, text=True, cwd=out.parent,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_there_are_numbered_examples():
    assert [p.name[:2] for p in EXAMPLES] == ["01", "02", "03", "04"]


def test_01_quantizes_from_a_folder_of_images(tmp_path):
    out = run_example(EXAMPLES[0], tmp_path / "out")
    assert re.search(r"^quantized 54 layers on 32 images in [\d.]+ s; wrote .*cls\.w4\.onnx "
                     r"\(INT4 weights holding 4-bit codes\)$", out, re.M), out
    sqnr = float(re.search(r"SQNR ([\d.]+) dB, top-1 agreement [\d.]+ on 64 held-out lines", out).group(1))
    assert 10 < sqnr < 40


def test_02_quantizes_from_memory(tmp_path):
    out = run_example(EXAMPLES[1], tmp_path / "out")
    assert "over 54 layers" in out and (tmp_path / "out" / "cls.w6.gptq.onnx").is_file()
    assert float(re.search(r"SQNR on held-out lines: ([\d.]+) dB", out).group(1)) > 20


def test_03_sweeps_from_one_capture(tmp_path):
    out = run_example(EXAMPLES[2], tmp_path / "out")
    rows = re.findall(r"^\s+(\d) +(\w+) +([\d.]+) +([\d.]+)$", out, re.M)
    assert [(bits, method) for bits, method, _, _ in rows] == [
        (b, m) for b in "864" for m in ("rtn", "gptq", "fastobq")]
    sqnr = {(b, m): float(s) for b, m, s, _ in rows}
    assert sqnr[("4", "fastobq")] > sqnr[("4", "rtn")]           # where the Hessian pays on this model
    assert (tmp_path / "out" / "cls.hessians.npz").is_file()


def test_04_compares_and_warns_on_the_calibration_data(tmp_path):
    out = run_example(EXAMPLES[3], tmp_path / "out").splitlines()
    held, calib = (i for i, line in enumerate(out) if line.startswith("on "))
    assert out[held].startswith("on 64 samples of eval.npz") and out[calib].startswith("on 32 samples of calib.npz")
    assert out[calib + 1].startswith("  warning: calibration=") and "the data the model was quantized on" in out[-1]
    assert len(out) == calib + 2                     # no warning after the held-out lines


def readme_commands() -> list[str]:
    """The sh blocks of the README's "Two commands" section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Two commands for a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_the_first_command_installs_then_quantizes_and_compares_as_the_readme_says(tmp_path):
    """Its install part is checked, the rest run here (this environment has the package) in a
    folder with the repository's models, and what it prints is what the README says it prints."""
    first, _ = readme_commands()
    steps = first.split(" && ")
    assert steps[:3] == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install ."]
    os.symlink(REPO / "models", tmp_path / "models")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(" && ".join(steps[3:]), shell=True, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    promised = re.search(r"SQNR ([\d.]+) dB, cosine ([\d.]+), and the same class on ([\d.]+) of the held-out lines",
                         (REPO / "README.md").read_text())
    lines = done.stdout.splitlines()
    row = lines[next(i for i, line in enumerate(lines) if line.startswith("output") and "SQNR dB" in line) + 1].split()
    assert row[1:4] == list(promised.groups()), (row, promised.groups())
    out = shlex.split(steps[3])[shlex.split(steps[3]).index("-o") + 1]
    quoted = re.search(rf"writes `{re.escape(out)}` \(INT4 weights, (\d+) KB\)", (REPO / "README.md").read_text())
    # within 1 KB: the file records the calibration data's absolute path
    assert quoted and abs((tmp_path / out).stat().st_size / 1000 - int(quoted.group(1))) < 1


def test_the_second_command_is_what_ci_runs():
    _, second = readme_commands()
    ci = (REPO / ".ci" / "run").read_text()
    assert second == 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && pytest -q'
    assert second in ci
