"""Tests of largebatch.client."""
