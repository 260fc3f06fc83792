"""One adapted layer's forward+backward speed against LoRA and a per-expert Python loop."""
