"""Sweep search spaces and presets as plain data (imports gmpq_core types only)."""
