"""The memory planner (adamole-plan, train --plan): bytes per rank of a training run, from the model's
config alone, and which cards it fits. See docs/memory_planner.md."""
