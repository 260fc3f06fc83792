"""Keyword arguments the project adds to a model call, named once for the floor that writes them (data/
batching.py, for packed rows) and the floor that reads them (adapters/inject.py's forward pre-hook)."""

# The valid-token mask [B, S] (1 = real token) of a call whose model sees no 2-D attention mask (packed
# rows): the adapters' pre-hook removes it from the call and keeps padding out of routing with it.
TOKEN_MASK_KWARG = "adapter_token_mask"
