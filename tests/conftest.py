"""Shared test configuration. Per-area fixtures live in each folder's conftest.py."""
