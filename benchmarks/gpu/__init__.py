"""The GPU acceptance run."""
