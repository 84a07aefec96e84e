import pytest
import torch

from emulator import gpu_tests
from emulator.gpu_tests import emulated_kernels  # noqa: F401  (a fixture of --emulate-gpu)


def pytest_addoption(parser):
    parser.addoption(
        "--gpu-sample",
        type=int,
        default=0,
        help="keep at most N parametrizations of each GPU test function, spread evenly over its grid "
        "(first and last included); 0 keeps all. For a first pass that must fit a short GPU session.",
    )
    parser.addoption(
        "--emulate-gpu",
        action="store_true",
        help="run the GPU tests on the CPU: csrc/'s glue and kernels through tests/emulator "
        "(see tests/emulator/gpu_tests.py); tests that need a real GPU's runtime are deselected",
    )
    parser.addoption(
        "--emulate-max-size", type=int, default=1100,
        help="with --emulate-gpu: deselect parametrizations with an integer above this (time)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line(
        "markers", "slow: long CPU sweeps (the kernel models' full grids); run only when selected with -m slow"
    )


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: sample what is left
def pytest_collection_modifyitems(config, items):
    if config.getoption("--emulate-gpu"):
        gpu_tests.select(config, items, config.getoption("--emulate-max-size"))
    elif not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
        return
    n = config.getoption("--gpu-sample")
    if n <= 0:
        return
    by_function: dict[tuple, list] = {}
    for item in items:
        if "gpu" in item.keywords:
            by_function.setdefault((item.path, item.originalname), []).append(item)
    dropped = set()
    for group in by_function.values():
        if len(group) > n:
            keep = {round(i * (len(group) - 1) / max(n - 1, 1)) for i in range(n)} if n > 1 else {0}
            dropped.update(id(item) for i, item in enumerate(group) if i not in keep)
    if dropped:
        config.hook.pytest_deselected(items=[item for item in items if id(item) in dropped])
        items[:] = [item for item in items if id(item) not in dropped]


@pytest.fixture(autouse=True)
def _seed(request, monkeypatch):
    if request.config.getoption("--emulate-gpu") and "gpu" in request.node.keywords:
        gpu_tests.emulate(request, monkeypatch)
    torch.manual_seed(0)
