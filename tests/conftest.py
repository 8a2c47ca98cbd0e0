"""Shared test configuration. Per-area fixtures live in each folder's conftest.py."""

import os
import tempfile

# Tests write only to temporary directories: Hypothesis keeps its example database (the failing
# examples it replays on the next run) and its caches under the system's temp directory instead of
# the checkout's .hypothesis/. Set before any test asks Hypothesis for its storage.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "largebatch-hypothesis"))
