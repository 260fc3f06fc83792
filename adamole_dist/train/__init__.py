"""Training: run assembly (build everything, then a Trainer holding only loop state), the one
training step every loop calls, the loop, reporting (routing summary, memory, routing table),
checkpoints, the expert optimizer and the learning-rate schedule."""
