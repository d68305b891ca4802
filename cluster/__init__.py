"""Ray cluster configs and connection helpers."""
