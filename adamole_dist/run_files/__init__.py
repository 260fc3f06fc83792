"""A run's files: the output directory (its checks, its lock, run_config.json), the metrics sinks
(JSONL/TensorBoard/wandb) and the run's figures. Atomic writes are adamole_dist/atomic_files.py; the
process runtime (watchdog, stop signals, host memory) is runtime/."""
