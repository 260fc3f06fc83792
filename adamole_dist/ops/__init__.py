"""Operating a run: the peer watchdog, stop signals and exit codes, the output directory, atomic
file writes, metrics sinks (JSONL/TensorBoard/wandb) and plots."""
