"""Running across ranks: the one home of every collective (collectives.py: reductions, broadcasts,
gathers; all_to_all.py: expert parallelism's exchanges), "rank 0 decides, every rank raises together"
(rank_zero.py), expert/data-parallel groups (layout.py), and the dispatchers that carry routed tokens
to their experts (local_dispatcher.py, ep_dispatcher.py). The placement cost model is costmodel/."""
