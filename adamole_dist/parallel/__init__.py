"""Running across ranks: the one home of every collective (collectives.py), expert/data-parallel
groups (layout.py), and the dispatchers that carry routed tokens to their experts
(local_dispatcher.py, ep_dispatcher.py). The placement cost model is costmodel/."""
