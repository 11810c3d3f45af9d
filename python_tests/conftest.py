"""Test configuration: where the Triton kernels run.

Default: on CPU tensors through the Triton interpreter.  TRITON_INTERPRET must be set
before any module defining a ``@triton.jit`` kernel is imported, so it is set here,
before pytest imports coorkern.

``COORKERN_TEST_DEVICE=cuda``: the CUDA tests (``python_tests/cuda/``) run on
CUDA tensors with the real Triton compiler; TRITON_INTERPRET is left unset (and must not
be set by the caller).  The interpreter-based tests of the other files then report
skipped, since CPU tensors cannot reach the Triton kernels without the interpreter.
Without a CUDA device every CUDA test is collected and reports "skipped: no CUDA device"
through the ``cuda_device`` fixture, whichever mode is chosen.
"""

import os

TEST_DEVICE_VAR = "COORKERN_TEST_DEVICE"
TEST_DEVICE = os.environ.get(TEST_DEVICE_VAR, "cpu").strip().lower() or "cpu"
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"{TEST_DEVICE_VAR} must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")
if TEST_DEVICE == "cuda":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise ValueError(f"{TEST_DEVICE_VAR}=cuda runs the real Triton compiler: unset TRITON_INTERPRET")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice; keeps its default

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))  # the shared helpers: ``from support.<module> import ...``
CUDA_TESTS_DIR = TESTS_DIR / "cuda"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on CUDA tensors (python_tests/cuda/)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if CUDA_TESTS_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.cuda)
        elif TEST_DEVICE == "cuda":
            item.add_marker(pytest.mark.skip(
                reason=f"{TEST_DEVICE_VAR}=cuda runs only python_tests/cuda/; this test needs "
                       "TRITON_INTERPRET=1 (the default mode)"))


@pytest.fixture
def cuda_device() -> torch.device:
    """``torch.device("cuda")``, or skip the test with "no CUDA device".

    In the default (interpreter) mode a CUDA machine would still run these tests, but the
    kernels were imported as interpreter objects: skip then too, naming the switch.
    """
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if TEST_DEVICE != "cuda":
        pytest.skip(f"CUDA tests need {TEST_DEVICE_VAR}=cuda (the Triton kernels are interpreted in this run)")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _seed_and_restore_backend(monkeypatch):
    monkeypatch.delenv("COORKERN_BACKEND", raising=False)
    torch.manual_seed(0)
    yield
