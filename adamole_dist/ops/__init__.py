"""Operating a run's files: the output directory and its lock, metrics sinks
(JSONL/TensorBoard/wandb), plots and host memory. Atomic writes are adamole_dist/atomic_files.py;
the process runtime (watchdog, stop signals) is runtime/."""
