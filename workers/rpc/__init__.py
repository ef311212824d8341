"""Synchronous callers: gRPC (``fraud.v1.FraudScoring``) and a small REST/JSON endpoint.

Both sit on one ``Dispatcher`` (``dispatch.py``) that gives every request an answer by its
deadline: the model's decision when the engine is in time, the rules fallback otherwise.
"""
