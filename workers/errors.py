"""Every exception the project raises on purpose, in one tree.

::

    FraudscoreError                      base: ``except FraudscoreError`` catches all of ours
    ├── InvalidEvent (ValueError)        a payload that cannot become a Transaction; ``kind``
    │                                    and ``reason`` go into the DLQ headers / error answer
    ├── ConfigError (ValueError)         settings that cannot work together (TLS key without cert, ...)
    ├── FeatureContractError (ValueError)  a model or feature block that does not fit the contract
    ├── ModelLoadError (RuntimeError)    a model that cannot serve: refused, the old one stays
    ├── FeaturesUnavailable (RuntimeError)  the online store did not answer: a *degradation*,
    │   │                                decided by the rules fallback (FEATURES_UNAVAILABLE)
    │   └── FeaturesLost                 it answered but lost its data (FEATURES_LOST)
    ├── BrokerNotReady (TimeoutError)    Kafka did not reach the state waited for in time
    └── ClientError                      raised by ``workers.rpc.client`` to its callers
        ├── ScoreRejected                the server answered a request with an error
        └── StreamBroken (ConnectionError)  the stream ended with requests unanswered

The engine treats ``FeaturesUnavailable`` as the store's state and anything else escaping a
reader or the model as a bug (logged with its traceback), though the caller still gets the
rules decision. The stdlib bases keep ``except ValueError`` style callers working.
"""

from __future__ import annotations


class FraudscoreError(Exception):
    """Base of every exception this project raises on purpose."""


class InvalidEvent(FraudscoreError, ValueError):
    """A payload that cannot become a Transaction; ``reason`` goes into the DLQ header."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        # tombstone | empty | too-large | malformed-json | malformed-protobuf | schema
        # | too-deep | invalid-utf8 | undecodable
        self.kind = kind
        self.reason = reason


class ConfigError(FraudscoreError, ValueError):
    """Settings that cannot work together."""


class FeatureContractError(FraudscoreError, ValueError):
    """A model expects other features, or another order, than the serving definition."""

    def __init__(self, expected: tuple[str, ...], found: tuple[str, ...]) -> None:
        super().__init__(expected, found)
        self.expected = expected
        self.found = found

    def __str__(self) -> str:
        missing = [n for n in self.expected if n not in self.found]
        extra = [n for n in self.found if n not in self.expected]
        detail = f"missing {missing}, unexpected {extra}" if missing or extra else "same names, other order"
        return (
            f"feature contract mismatch: the model was trained on {len(self.found)} features "
            f"that differ from the serving definition ({len(self.expected)} features): {detail}"
        )


class ModelLoadError(FraudscoreError, RuntimeError):
    """A model file that cannot serve (missing, corrupt, wrong contract): it is refused."""


class FeaturesUnavailable(FraudscoreError, RuntimeError):
    """The online store did not answer (connection refused, timeout, ...): fall back."""


class FeaturesLost(FeaturesUnavailable):
    """The online store answered but has lost its data (flushed, evicted, restarted empty):
    its "not found" would turn every customer into a new one, so fall back without features."""


class BrokerNotReady(FraudscoreError, TimeoutError):
    """Kafka did not reach the state waited for (metadata answered, a group stable) in time."""


class ClientError(FraudscoreError):
    """Raised by the Python client (``workers.rpc.client``) to its callers."""


class ScoreRejected(ClientError):
    """The server answered this request with an error (e.g. 3 INVALID_ARGUMENT)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class StreamBroken(ClientError, ConnectionError):
    """The stream ended or failed while this request waited; it may or may not have been scored."""
