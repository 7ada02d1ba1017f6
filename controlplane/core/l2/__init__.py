"""L2, the semantic layer's index: a vector store (Milvus) behind small core parts.

:class:`~controlplane.core.l2.index.L2Index` is what the response cache searches and
writes. It composes parts with one job each, every one with an injected clock and its
waits through one sleep (``timing.Time``):

- ``store``     the port: the vector-store operations the index needs (a Protocol; the
                Milvus adapter ``controlplane.adapters.milvus.MilvusStore`` implements it,
                tests also use an in-memory fake);
- ``schema``    the collection's dimension: opened, created at the first write, checked;
- ``recent``    rows written since the last completed flush, searched beside the store,
                and the debounced flush;
- ``mirror`` / ``mirrored``  searched scopes copied in memory and searched with numpy,
                filled and refreshed in the background;
- ``presence``  whether a scope holds live rows, answered from memory where that is safe;
- ``expiry``    rows older than the TTL deleted from the store periodically.
"""
