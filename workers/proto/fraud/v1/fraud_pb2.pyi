from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    APPROVE: _ClassVar[Outcome]
    REVIEW: _ClassVar[Outcome]
    DECLINE: _ClassVar[Outcome]

class DegradedCause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEGRADED_CAUSE_NONE: _ClassVar[DegradedCause]
    FEATURES_UNAVAILABLE: _ClassVar[DegradedCause]
    MODEL_UNAVAILABLE: _ClassVar[DegradedCause]
    BUDGET_EXCEEDED: _ClassVar[DegradedCause]
    OVERLOADED: _ClassVar[DegradedCause]
    FEATURES_LOST: _ClassVar[DegradedCause]
OUTCOME_UNSPECIFIED: Outcome
APPROVE: Outcome
REVIEW: Outcome
DECLINE: Outcome
DEGRADED_CAUSE_NONE: DegradedCause
FEATURES_UNAVAILABLE: DegradedCause
MODEL_UNAVAILABLE: DegradedCause
BUDGET_EXCEEDED: DegradedCause
OVERLOADED: DegradedCause
FEATURES_LOST: DegradedCause

class Transaction(_message.Message):
    __slots__ = ("transaction_id", "customer_id", "terminal_id", "amount", "event_time_us", "currency")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_US_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    customer_id: int
    terminal_id: int
    amount: float
    event_time_us: int
    currency: str
    def __init__(self, transaction_id: _Optional[str] = ..., customer_id: _Optional[int] = ..., terminal_id: _Optional[int] = ..., amount: _Optional[float] = ..., event_time_us: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class FraudLabel(_message.Message):
    __slots__ = ("transaction_id", "customer_id", "terminal_id", "event_time_us", "is_fraud", "label_time_us")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_US_FIELD_NUMBER: _ClassVar[int]
    IS_FRAUD_FIELD_NUMBER: _ClassVar[int]
    LABEL_TIME_US_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    customer_id: int
    terminal_id: int
    event_time_us: int
    is_fraud: bool
    label_time_us: int
    def __init__(self, transaction_id: _Optional[str] = ..., customer_id: _Optional[int] = ..., terminal_id: _Optional[int] = ..., event_time_us: _Optional[int] = ..., is_fraud: _Optional[bool] = ..., label_time_us: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_us", "enrich_us", "inference_us", "decide_us", "total_us", "device")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    ENRICH_US_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_US_FIELD_NUMBER: _ClassVar[int]
    DECIDE_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    enrich_us: int
    inference_us: int
    decide_us: int
    total_us: int
    device: str
    def __init__(self, queue_us: _Optional[int] = ..., enrich_us: _Optional[int] = ..., inference_us: _Optional[int] = ..., decide_us: _Optional[int] = ..., total_us: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("transaction_id", "outcome", "score", "reason_codes", "model_version", "degraded", "degraded_cause", "degraded_detail", "timing", "event_time_us", "decided_at_us", "traceparent")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_CODES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_CAUSE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_DETAIL_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_US_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_US_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    outcome: Outcome
    score: float
    reason_codes: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    degraded: bool
    degraded_cause: DegradedCause
    degraded_detail: str
    timing: Timing
    event_time_us: int
    decided_at_us: int
    traceparent: str
    def __init__(self, transaction_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., score: _Optional[float] = ..., reason_codes: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., degraded: _Optional[bool] = ..., degraded_cause: _Optional[_Union[DegradedCause, str]] = ..., degraded_detail: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., event_time_us: _Optional[int] = ..., decided_at_us: _Optional[int] = ..., traceparent: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "transaction", "budget_us")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    BUDGET_US_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transaction: Transaction
    budget_us: int
    def __init__(self, request_id: _Optional[str] = ..., transaction: _Optional[_Union[Transaction, _Mapping]] = ..., budget_us: _Optional[int] = ...) -> None: ...

class ScoreError(_message.Message):
    __slots__ = ("code", "message", "duplicate_request_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    duplicate_request_id: bool
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., duplicate_request_id: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "decision", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    decision: Decision
    error: ScoreError
    def __init__(self, request_id: _Optional[str] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., error: _Optional[_Union[ScoreError, _Mapping]] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ScoreRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ScoreRequest, _Mapping]]] = ...) -> None: ...

class ScoreBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[ScoreResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[ScoreResponse, _Mapping]]] = ...) -> None: ...
