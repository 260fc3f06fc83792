"""The process runtime: process-group start-up for every launcher (process_group.py), the peer
watchdog (watchdog.py), and why a run stops early with the exit codes it maps to (stopping.py)."""
