"""Training throughput over ranks and nodes (and against PEFT), all through one measured worker."""
