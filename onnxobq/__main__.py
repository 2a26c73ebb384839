"""``python -m onnxobq`` and the ``onnxobq`` command: the command line, started the way a run should be."""
import os
import signal
import sys


def main() -> int:
    """Run the command line. OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when NumPy loads, so it is set
    here, before onnxobq imports NumPy: its idle threads spin for 2^28 cycles (about 0.1 s)
    after each call, and on the CPU every forward pass of the capture follows the Hessian
    products, so a spinning BLAS thread took a core from onnxruntime. 2^20 cycles (under a
    millisecond) still bridges the solver's back-to-back calls. On 2 cores the YOLOX detector's
    capture of 48 images took 12.0 to 12.2 s instead of 12.7 to 14.7 s, and ResNet-50's solve
    32.6 and 34.7 s against 32.7 and 32.9 s (2^4 cycles made it 36.6 to 38.8 s). A value the user
    set wins."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from .cli import main as run
    except KeyboardInterrupt:       # Ctrl-C while the libraries load
        sys.stderr.write("onnxobq: interrupted\n")
        return 130
    return run()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that a terminated run cleans
    up (temporary folders and files, partial outputs) as an interrupted one does."""


def _terminate(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
