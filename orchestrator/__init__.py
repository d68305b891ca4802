"""The orchestrator: CLI, Ray Tune sweep, Optuna adapters, MLflow sink, Parquet results, Ray Train stage."""
