"""The process runtime: process-group start-up for every launcher (process_group.py), the peer
watchdog (watchdog.py), why a run stops early with the exit codes it maps to (stopping.py), and the
host memory allocator's setting (host_memory.py)."""
