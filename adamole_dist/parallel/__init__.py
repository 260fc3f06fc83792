"""Running across ranks: process-group start-up (process_group.py), the one home of every
collective (collectives.py), expert/data-parallel groups (layout.py), the dispatchers that carry
routed tokens to their experts (local_dispatcher.py, ep_dispatcher.py), and the placement cost
model behind ``--ep_size auto`` (placement.py)."""
