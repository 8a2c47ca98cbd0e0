"""Shared test configuration. Per-area fixtures live in each folder's conftest.py."""

import os
import tempfile

# Tests write only to temporary directories: Hypothesis keeps its example database (the failing
# examples it replays on the next run) and its caches under the system's temp directory instead of
# the checkout's .hypothesis/. Set before any test asks Hypothesis for its storage.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "largebatch-hypothesis"))

# Modules whose every test is slow and whose collection alone costs seconds in each worker
# (transformers, lightning, schemathesis's per-operation tests): left uncollected when the run
# deselects slow tests (scripts/test.sh --fast). The full run collects them, and checks they are
# still wholly slow, so no fast test can hide in them.
WHOLLY_SLOW = frozenset({"test_fuzz.py", "test_e2e_hf.py", "test_e2e_lightning.py"})


def _deselects_slow(config) -> bool:
    return "not slow" in (config.option.markexpr or "")


def pytest_ignore_collect(collection_path, config):
    if collection_path.name in WHOLLY_SLOW and _deselects_slow(config):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    fast = [i.nodeid for i in items if i.path.name in WHOLLY_SLOW and i.get_closest_marker("slow") is None]
    if fast:
        raise ValueError(f"tests not marked slow in a module --fast leaves uncollected: {fast}")
