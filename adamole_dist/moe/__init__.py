"""Mixture-of-LoRA-experts tensor maths: routing, capacity, load-balancing losses, routing
statistics, expert banks and the permutations that group tokens by destination. No
communication: imports only ``config`` (tests/unit/architecture/test_layering.py holds it to that).
Tensor-name letters: ``adamole_dist/glossary.py``."""
