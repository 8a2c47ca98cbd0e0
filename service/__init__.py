"""largebatch.service."""
