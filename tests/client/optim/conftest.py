"""Optimizer tests: tiny tensors, so one intra-op thread (faster, and immune to a busy machine).

Without a GPU, the fused path's Triton kernels run under Triton's interpreter on CPU tensors: the
variable must be set before the kernels are first imported. Tests of the fused path are skipped
where it cannot run (Triton not installed, or a GPU machine where CPU tensors cannot take it).
"""

import os

import pytest

torch = pytest.importorskip("torch")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def fused_runs_on_cpu() -> bool:
    from largebatch.client.optim._fused import fused_available

    return fused_available(torch.device("cpu"))


def _is_fused(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("path") == "fused" or "fused" in item.name


def pytest_collection_modifyitems(config, items):
    # Under Triton's interpreter each fused step costs ~0.1-1.5 s: those tests belong to the full run
    # (CI), not to `scripts/test.sh --fast`, which keeps the single and foreach paths.
    for item in items:
        if _is_fused(item):
            item.add_marker(pytest.mark.slow)
    if fused_runs_on_cpu():
        return
    skip = pytest.mark.skip(reason="the fused path needs Triton's interpreter on CPU (pip install triton)")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("path") == "fused":
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_backend(request):
    """``path="cpu_kernel"``: the fused path on the C kernels (the interpreter stays for "fused")."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("path") != "cpu_kernel":
        yield
        return
    from largebatch.client.optim import _cpu_fused, _fused

    reason = _cpu_fused.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CPU kernels cannot be built here: {reason}")
    with _fused.cpu_backend("c"):
        yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
