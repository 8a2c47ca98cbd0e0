"""Tests of the REST service (largebatch.service), through HTTP."""
