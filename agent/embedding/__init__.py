"""Embeddings behind ``Node.Embed`` (and the pair scorer behind ``Node.ScorePairs``): one
module per concept, imported as modules.

======================  ===============================================================
``errors``              the error tree (mapped to gRPC codes in :mod:`agent.node_service`)
``protocol``            what the service needs of an embedder; the start-once base
``batcher``             natural micro-batching, fair between tenants, bounded, cancelled
                        callers leave the queue
``model``               all-MiniLM-L6-v2: loading, its id, the tokenizer, length-ordered chunks
``torch_path``          the model's vectors in torch
``onnx_path``           its transformer in onnxruntime, checked against torch at start
``minilm``              the in-process embedder (either runtime, off the event loop)
``tuned``               the same with a fine-tuning applied (``embedder.tuning``)
``tei``                 the Text Embeddings Inference client
``service``             per-call limits, the per-tenant cache, the embedder: what Embed calls
``pair_scorer_onnx``    the pair scorer's network in onnxruntime, checked against torch
``pair_scorer_bf16``    ... in bfloat16 on oneDNN (AMX CPUs, opt-in), checked against float32
``pair_scorer``         the cache's cross-encoder behind ``Node.ScorePairs`` (loaded once, off
                        the event loop, one call at a time)
======================  ===============================================================

Each imports only the modules above it in this table (and :mod:`agent.core`,
:mod:`agent.config`, :mod:`synapse_common`); nothing here imports gRPC. Nothing is
re-exported here, so importing one module never loads another's dependencies (aiohttp
for ``tei``, torch only when a model is loaded).
"""
