"""The feature contract, defined once for training and serving.

Names, order and defaults live here and nowhere else. The offline pipeline (training) and
the online readers (serving) both evaluate the windows with the functions in
``workers.features.offline`` and build the model input with ``assemble`` below, so the two
cannot drift apart; the ordered names are written into the ONNX model's metadata and
compared when a model is loaded.

What the online store holds is raw recent state, not aggregates (``history.py``): per
customer its recent events, per terminal one tile per UTC day. Every window is evaluated at
the transaction's own event time T, so a value never depends on when the store was last
written (a scorer/job race changes nothing), and T itself is never counted.

- per customer, windows ``[T - w, T)`` (anything at T or later is excluded): number of
  transactions and mean amount over 1/7/30 days (the Fraud Detection Handbook's baseline),
  and the velocity features only a stream can keep fresh: number and total amount over the
  last 10 minutes and hour, seconds since the previous transaction (at most
  ``SECONDS_SINCE_PREV_CAP_DAYS``; that value when there is none) and the number of distinct
  terminals used in the last hour;
- per terminal, over whole UTC days ``[day(T) - delay - d, day(T) - delay)`` for d in
  1/7/30 (``delay = TERMINAL_LABEL_DELAY_DAYS``): number of transactions and the share labelled
  fraud. The Handbook ends the window at ``T - delay`` to the microsecond; whole days let the
  store keep one small tile per day instead of every event of a busy terminal, and because a
  label arrives ``delay`` days after its transaction, every label of a window day is known at
  T: training and serving agree without racing the labels.

Amounts are summed in integer cents (``history.amount_cents``), so the window sums are exact
in float64 whatever order or grouping computes them. Entities without history in a window
get 0, in training and in serving alike.
"""

from __future__ import annotations

import numpy as np

from workers.errors import FeatureContractError
from workers.records import US_PER_DAY, US_PER_HOUR, US_PER_MINUTE

WINDOWS_DAYS = (1, 7, 30)
# Velocity windows (name suffix, length in us): counts and amounts of the last minutes.
VELOCITY_WINDOWS = (("10min", 10 * US_PER_MINUTE), ("1h", US_PER_HOUR))
DISTINCT_TERMINALS_WINDOW = ("1h", US_PER_HOUR)
SECONDS_SINCE_PREV_CAP_DAYS = 30
TERMINAL_LABEL_DELAY_DAYS = 7
NIGHT_END_HOUR = 6  # a transaction before 06:00 UTC counts as night, as in the Handbook

CUSTOMER_ENTITY = "customer"
CUSTOMER_JOIN_KEY = "customer_id"
TERMINAL_ENTITY = "terminal"
TERMINAL_JOIN_KEY = "terminal_id"
# The online store's views: one packed Bytes field each (layouts in ``history.py``).
CUSTOMER_VIEW = "customer_activity"
CUSTOMER_EVENTS_FIELD = "events"
TERMINAL_VIEW = "terminal_activity"
TERMINAL_TILES_FIELD = "tiles"

CUSTOMER_WINDOW_FEATURES = tuple(
    name for days in WINDOWS_DAYS for name in (f"customer_nb_tx_{days}d", f"customer_avg_amount_{days}d")
)
CUSTOMER_VELOCITY_FEATURES = (
    *(name for suffix, _ in VELOCITY_WINDOWS for name in (f"customer_nb_tx_{suffix}", f"customer_amount_{suffix}")),
    "customer_seconds_since_prev",
    f"customer_nb_terminals_{DISTINCT_TERMINALS_WINDOW[0]}",
)
CUSTOMER_FEATURES = CUSTOMER_WINDOW_FEATURES + CUSTOMER_VELOCITY_FEATURES
TERMINAL_FEATURES = tuple(
    name for days in WINDOWS_DAYS for name in (f"terminal_nb_tx_{days}d", f"terminal_risk_{days}d")
)
REQUEST_FEATURES = (
    "tx_amount",
    "tx_during_weekend",
    "tx_during_night",
    "amount_over_customer_avg_30d",
)

# The model input, in this exact order.
FEATURE_NAMES: tuple[str, ...] = REQUEST_FEATURES + CUSTOMER_FEATURES + TERMINAL_FEATURES
N_FEATURES = len(FEATURE_NAMES)
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}

# Value used for an entity the online store does not know (a new card or terminal).
ENTITY_DEFAULT = 0.0
# amount / customer mean is undefined without history: 1.0 means "as usual".
RATIO_DEFAULT = 1.0

# Key under which the ordered names are stored in ONNX model metadata (JSON list).
MODEL_METADATA_KEY = "feature_names"
# The model's one input (float32, (rows, N_FEATURES)) and the output the engine reads
# (float32 fraud probability, (rows,)): training writes them, serving looks them up.
MODEL_INPUT_NAME = "features"
MODEL_OUTPUT_NAME = "fraud_probability"

# 1970-01-01 was a Thursday: weekday index (Monday=0) of day 0 is 3.
_EPOCH_WEEKDAY = 3


def check_contract(model_feature_names: tuple[str, ...] | list[str]) -> None:
    """Raises ``FeatureContractError`` unless the model expects exactly ``FEATURE_NAMES``."""
    found = tuple(model_feature_names)
    if found != FEATURE_NAMES:
        raise FeatureContractError(expected=FEATURE_NAMES, found=found)


def request_time_features(
    amount: np.ndarray,
    event_time_us: np.ndarray,
    customer_avg_amount_30d: np.ndarray,
    customer_nb_tx_30d: np.ndarray,
) -> np.ndarray:
    """The request-time columns, vectorised; shape (n, len(REQUEST_FEATURES)), float32."""
    amount = np.asarray(amount, dtype=np.float64)
    event_time_us = np.asarray(event_time_us, dtype=np.int64)
    day = event_time_us // US_PER_DAY
    hour = (event_time_us % US_PER_DAY) // US_PER_HOUR
    weekday = (day + _EPOCH_WEEKDAY) % 7
    avg = np.asarray(customer_avg_amount_30d, dtype=np.float64)
    has_history = (np.asarray(customer_nb_tx_30d) > 0) & (avg > 0)
    ratio = np.divide(amount, avg, out=np.full_like(amount, RATIO_DEFAULT), where=has_history)
    out = np.empty((amount.shape[0], len(REQUEST_FEATURES)), dtype=np.float32)
    out[:, 0] = amount
    out[:, 1] = weekday >= 5
    out[:, 2] = hour < NIGHT_END_HOUR
    out[:, 3] = ratio
    return out


def assemble(
    amount: np.ndarray,
    event_time_us: np.ndarray,
    customer: np.ndarray,
    terminal: np.ndarray,
) -> np.ndarray:
    """The model input matrix (n, N_FEATURES) float32 in ``FEATURE_NAMES`` order.

    ``customer`` is (n, len(CUSTOMER_FEATURES)) and ``terminal`` is
    (n, len(TERMINAL_FEATURES)), columns in the order of those tuples, with
    ``ENTITY_DEFAULT`` already filled in for unknown entities.
    """
    customer = np.asarray(customer, dtype=np.float32)
    terminal = np.asarray(terminal, dtype=np.float32)
    if len(customer) <= FEW_ROWS:
        return _assemble_few(amount, event_time_us, customer, terminal)
    return _assemble_many(amount, event_time_us, customer, terminal)


def _assemble_many(
    amount: np.ndarray, event_time_us: np.ndarray, customer: np.ndarray, terminal: np.ndarray
) -> np.ndarray:
    avg_30d = customer[:, _AVG_30D]
    nb_30d = customer[:, _NB_30D]
    request = request_time_features(amount, event_time_us, avg_30d, nb_30d)
    return np.concatenate([request, customer, terminal], axis=1)


# Up to this many rows ``assemble`` builds the rows in plain Python: numpy's fixed cost per
# call (~20 calls) was most of a one-row assembly. The same float64 arithmetic, then one
# float32 conversion as numpy's; tests/features/test_assemble.py holds the two equal.
FEW_ROWS = 8
_AVG_30D = CUSTOMER_FEATURES.index("customer_avg_amount_30d")
_NB_30D = CUSTOMER_FEATURES.index("customer_nb_tx_30d")


def _assemble_few(
    amount: np.ndarray, event_time_us: np.ndarray, customer: np.ndarray, terminal: np.ndarray
) -> np.ndarray:
    rows = []
    amounts = np.asarray(amount, dtype=np.float64).tolist()
    times = np.asarray(event_time_us, dtype=np.int64).tolist()
    for a, t, c, k in zip(amounts, times, customer.tolist(), terminal.tolist(), strict=True):
        day, time_of_day = divmod(t, US_PER_DAY)
        avg = c[_AVG_30D]
        ratio = a / avg if c[_NB_30D] > 0 and avg > 0 else RATIO_DEFAULT
        weekend = (day + _EPOCH_WEEKDAY) % 7 >= 5
        night = time_of_day // US_PER_HOUR < NIGHT_END_HOUR
        rows.append([a, float(weekend), float(night), ratio, *c, *k])
    return np.array(rows, dtype=np.float32).reshape(len(rows), N_FEATURES)
