"""The scoring engine: batcher -> enrich -> score (ONNX Runtime pools) -> decide.

Shared by the Kafka worker and the gRPC service, which depend only on the interfaces in
``workers.types`` (``Engine``, ``Priority``, the ``DoneCallback`` contract).

| module | what |
|---|---|
| ``batcher`` | the one bounded EDF queue with adaptive batches and the sync lane |
| ``engine`` | ``ScoringEngine``: executors that enrich, score, decide and answer |
| ``scoring`` | ONNX Runtime session pools and the GPU-first / CPU-overflow router |
| ``models`` | the model registry, hot reload, and the serving model |
| ``decide`` | scores -> outcomes with reason codes; the rules fallback |
| ``store_health`` | the online store's state as the reads find it, and the idle probe |
"""
