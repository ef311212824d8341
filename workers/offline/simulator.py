"""A transaction simulator after the Fraud Detection Handbook (Le Borgne et al.), vectorised.

Customers and terminals live on a 100x100 grid; a customer pays only at terminals within
``radius`` of home. Each customer has a mean amount ~ U(5, 100) (std = mean / 2) and a
Poisson daily count with mean ~ U(0, 4). Times of day ~ N(noon, 20000 s); draws outside the
day are dropped, as the Handbook does. Three fraud scenarios are injected:

1. any amount above 220 is fraud;
2. each day 2 random terminals are compromised for the next 28 days: all their
   transactions are fraud;
3. each day 3 random customers are compromised for the next 14 days: a third of their
   transactions have their amount multiplied by 5 and are fraud.

A fourth scenario, card testing, is off by default (``SimulatorConfig.card_testing``) so
that the Handbook's figures stay comparable:

4. each day ``CARD_TESTING_BURSTS_PER_DAY`` random cards are stolen and tested: a burst of
   small purchases, then a few large ones, at distinct terminals within minutes (see
   ``card_testing_burst`` for the parameters and why). Every burst transaction is fraud.
   Nothing else in the data changes: the bursts come from their own random stream and are
   added to the Handbook's transactions, so scenarios 1-3 are identical with it on or off.

Everything is drawn from one ``numpy.random.Generator`` per seed, population first, so the
same seed gives the same customers and terminals to the training set and to the live stream.

By default the history covers ``n_days`` from 2018-04-01 (the Handbook's period). A demo
wants a history that ends *now*, so that a live stream continues it: ``SimulatorConfig.ending_at``
puts the last simulated day on the given UTC day and drops what would lie after the given instant.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workers.records import SECONDS_PER_DAY, US_PER_SECOND, Transaction

FRAUD_AMOUNT_THRESHOLD = 220.0
COMPROMISED_TERMINALS_PER_DAY = 2
TERMINAL_COMPROMISE_DAYS = 28
COMPROMISED_CUSTOMERS_PER_DAY = 3
CUSTOMER_COMPROMISE_DAYS = 14
CUSTOMER_FRAUD_SHARE = 1 / 3
CUSTOMER_FRAUD_AMOUNT_FACTOR = 5.0

# Scenario 4, card testing (see ``card_testing_burst`` for why these values). Two bursts a
# day (as scenario 2's two terminals) add ~27 frauds a day to the Handbook's ~80: enough to
# matter to a model, not so many that they drown scenarios 1-3.
CARD_TESTING_BURSTS_PER_DAY = 2
CARD_TESTING_SMALL_TX = (5, 15)  # inclusive range of the number of small "testing" purchases
CARD_TESTING_LARGE_TX = (2, 5)  # inclusive range of the number of large "cash-out" purchases
CARD_TESTING_SMALL_AMOUNT = (1.0, 5.0)
CARD_TESTING_LARGE_AMOUNT = (100.0, FRAUD_AMOUNT_THRESHOLD)
CARD_TESTING_DURATION_S = (10 * 60, 20 * 60)
CARD_TESTING_SCENARIO = 4
# The burst randomness is its own stream, derived from the seed, so that switching the
# scenario on leaves every draw of scenarios 1-3 (and of the live stream) as it was.
_CARD_TESTING_STREAM = 4


@dataclass(frozen=True)
class SimulatorConfig:
    """Defaults reproduce the Handbook's dataset size (about 1.75M transactions)."""

    n_customers: int = 5_000
    n_terminals: int = 10_000
    n_days: int = 183
    start_date: date = date(2018, 4, 1)
    radius: float = 5.0
    seed: int = 0
    card_testing: bool = False  # scenario 4; off keeps the Handbook's dataset (and figures) as they were
    end_us: int | None = None  # drop transactions at or after this instant (a history that ends "now")

    @property
    def start_us(self) -> int:
        start = datetime(self.start_date.year, self.start_date.month, self.start_date.day, tzinfo=UTC)
        return int(start.timestamp()) * US_PER_SECOND

    @classmethod
    def ending_at(cls, end_us: int, **fields: Any) -> SimulatorConfig:
        """A history whose last simulated day is ``end_us``'s UTC day, cut at ``end_us``.

        Days keep starting at UTC midnight, so times of day, weekends and the terminals'
        whole-day windows mean what they mean in the Handbook's 2018 period; the last day is
        partial: a live stream stamped "now" takes over where it stops.
        """
        n_days = int(fields.get("n_days", cls.n_days))
        last_day = datetime.fromtimestamp(end_us / US_PER_SECOND, tz=UTC).date()
        return cls(start_date=last_day - timedelta(days=n_days - 1), end_us=end_us, **fields)

    @classmethod
    def ending_now(cls, **fields: Any) -> SimulatorConfig:
        return cls.ending_at(time.time_ns() // 1000, **fields)


@dataclass(frozen=True)
class Population:
    """Customer profiles and, per customer, the terminals in reach (CSR layout)."""

    mean_amount: np.ndarray  # (n_customers,)
    std_amount: np.ndarray
    mean_daily_tx: np.ndarray
    reach_offsets: np.ndarray  # (n_customers + 1,): terminals of c are reach_terminals[o[c]:o[c+1]]
    reach_terminals: np.ndarray
    n_terminals: int

    @property
    def n_customers(self) -> int:
        return self.mean_amount.shape[0]

    @property
    def reach_counts(self) -> np.ndarray:
        return np.diff(self.reach_offsets)


def make_population(config: SimulatorConfig, rng: np.random.Generator) -> Population:
    customer_xy = rng.uniform(0, 100, size=(config.n_customers, 2))
    mean_amount = rng.uniform(5, 100, size=config.n_customers)
    mean_daily_tx = rng.uniform(0, 4, size=config.n_customers)
    terminal_xy = rng.uniform(0, 100, size=(config.n_terminals, 2))
    offsets, terminals = _terminals_in_reach(customer_xy, terminal_xy, config.radius)
    return Population(mean_amount, mean_amount / 2, mean_daily_tx, offsets, terminals, config.n_terminals)


def _terminals_in_reach(
    customer_xy: np.ndarray, terminal_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial import cKDTree

    neighbours = cKDTree(terminal_xy).query_ball_point(customer_xy, r=radius, return_sorted=True)
    counts = np.fromiter((len(n) for n in neighbours), dtype=np.int64, count=len(neighbours))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    flat = np.fromiter((t for n in neighbours for t in n), dtype=np.int64, count=int(offsets[-1]))
    return offsets, flat


def _pick_terminals(population: Population, customers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uniformly chosen terminal in reach per transaction (customers must have one)."""
    counts = population.reach_counts[customers]
    pick = (rng.random(customers.shape[0]) * counts).astype(np.int64)
    return population.reach_terminals[population.reach_offsets[customers] + pick]


def _draw_amounts(population: Population, customers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = population.mean_amount[customers]
    amounts = rng.normal(mean, population.std_amount[customers])
    # The Handbook redraws a negative amount uniformly in [0, 2 * mean].
    negative = amounts < 0
    amounts[negative] = rng.uniform(0, 2 * mean[negative])
    return np.round(amounts, 2)


def simulate_transactions(config: SimulatorConfig = SimulatorConfig()) -> pd.DataFrame:
    """The labelled dataset, sorted by time, one row per transaction."""
    rng = np.random.default_rng(config.seed)
    population = make_population(config, rng)
    n_days = config.n_days
    daily_counts = rng.poisson(np.repeat(population.mean_daily_tx, n_days)).reshape(-1, n_days)
    # Customers without a terminal in reach never transact (as in the Handbook).
    daily_counts[population.reach_counts == 0] = 0
    customers = np.repeat(np.repeat(np.arange(config.n_customers), n_days), daily_counts.ravel())
    days = np.repeat(np.tile(np.arange(n_days), config.n_customers), daily_counts.ravel())
    seconds = rng.normal(SECONDS_PER_DAY / 2, 20_000, size=customers.shape[0]).astype(np.int64)
    in_day = (seconds > 0) & (seconds < SECONDS_PER_DAY)
    customers, days, seconds = customers[in_day], days[in_day], seconds[in_day]
    amounts = _draw_amounts(population, customers, rng)
    terminals = _pick_terminals(population, customers, rng)

    time_s = days * SECONDS_PER_DAY + seconds
    order = np.lexsort((customers, time_s))
    frame = pd.DataFrame(
        {
            "transaction_id": np.arange(order.shape[0], dtype=np.int64),
            "customer_id": customers[order],
            "terminal_id": terminals[order],
            "amount": amounts[order],
            "event_time_us": config.start_us + time_s[order] * US_PER_SECOND,
            "day": days[order].astype(np.int32),
        }
    )
    _inject_frauds(frame, config, rng)
    frame = frame.drop(columns="day")
    if config.card_testing:
        frame = _with_card_testing(frame, population, config)
    if config.end_us is not None:
        # Rows are sorted by time, so the cut keeps the ids contiguous from 0.
        frame = frame[frame["event_time_us"].to_numpy() < config.end_us].reset_index(drop=True)
    return frame


def _inject_frauds(frame: pd.DataFrame, config: SimulatorConfig, rng: np.random.Generator) -> None:
    n = len(frame)
    scenario = np.zeros(n, dtype=np.int8)
    amount = frame["amount"].to_numpy().copy()
    day = frame["day"].to_numpy()

    scenario[amount > FRAUD_AMOUNT_THRESHOLD] = 1

    compromised_terminal_until = _compromise_schedule(
        config.n_terminals, config.n_days, COMPROMISED_TERMINALS_PER_DAY, TERMINAL_COMPROMISE_DAYS, rng
    )
    terminal_hit = _hit_by_schedule(compromised_terminal_until, frame["terminal_id"].to_numpy(), day)
    scenario[terminal_hit] = 2  # later scenarios take over the label, as in the Handbook

    compromised_customer_until = _compromise_schedule(
        config.n_customers, config.n_days, COMPROMISED_CUSTOMERS_PER_DAY, CUSTOMER_COMPROMISE_DAYS, rng
    )
    customer_hit = _hit_by_schedule(compromised_customer_until, frame["customer_id"].to_numpy(), day)
    chosen = customer_hit & (rng.random(n) < CUSTOMER_FRAUD_SHARE)
    amount[chosen] = np.round(amount[chosen] * CUSTOMER_FRAUD_AMOUNT_FACTOR, 2)
    scenario[chosen] = 3

    frame["amount"] = amount
    frame["is_fraud"] = (scenario > 0).astype(np.int8)
    frame["fraud_scenario"] = scenario


def _compromise_schedule(
    n_entities: int, n_days: int, per_day: int, duration: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, int, int]]:
    """Per day, the entities compromised from that day for ``duration`` days."""
    return [(rng.choice(n_entities, size=per_day, replace=False), d, d + duration) for d in range(n_days)]


def _hit_by_schedule(schedule: list[tuple[np.ndarray, int, int]], entity: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Transactions of an entity on a day when it was compromised.

    A dense (entity x day) boolean table keeps this vectorised: 10k x 183 booleans is tiny.
    """
    n_entities = int(max(entity.max(initial=0), max(int(e.max()) for e, _, _ in schedule)) + 1)
    n_days = int(max(day.max(initial=0), max(end for _, _, end in schedule)) + 1)
    table = np.zeros((n_entities, n_days), dtype=bool)
    for entities, start, end in schedule:
        table[entities, start:end] = True
    return table[entity, day]


# --- scenario 4: card testing -------------------------------------------------------------


def card_testing_burst(
    rng: np.random.Generator, n_terminals: int, customer: int, start_us: int
) -> dict[str, np.ndarray]:
    """One card-testing burst on ``customer``'s card from ``start_us``: columns, sorted by time.

    A fraudster with a stolen card number first checks that it works with small purchases,
    then cashes out before the card is blocked (the pattern the card schemes call "card
    testing" / "enumeration"). The parameters:

    - 5-15 small purchases of $1-5: few enough to pass unnoticed one by one, many enough to
      try several merchants (and card details); amounts a cardholder's statement hides;
    - then 2-5 large purchases of $100-220: large against the customers' usual spend (their
      means are $5-100) but below scenario 1's $220, so the amount alone does not give
      them away and catching them needs the card's recent activity;
    - all within 10-20 minutes (uniform), at distinct terminals drawn from all terminals:
      card-not-present fraud happens at merchants the fraudster picks, not near the
      cardholder's home, and a bot spreads the attempts so that no one merchant sees many.

    Times are uniform over the burst, sorted; the small purchases come first. The burst
    lies inside ``[start_us, start_us + 20 min]``.
    """
    n_small = int(rng.integers(CARD_TESTING_SMALL_TX[0], CARD_TESTING_SMALL_TX[1] + 1))
    n_large = int(rng.integers(CARD_TESTING_LARGE_TX[0], CARD_TESTING_LARGE_TX[1] + 1))
    n = n_small + n_large
    duration_s = rng.uniform(*CARD_TESTING_DURATION_S)
    offsets_us = np.sort((rng.random(n) * duration_s * US_PER_SECOND).astype(np.int64))
    amounts = np.concatenate(
        [rng.uniform(*CARD_TESTING_SMALL_AMOUNT, size=n_small), rng.uniform(*CARD_TESTING_LARGE_AMOUNT, size=n_large)]
    )
    return {
        "customer_id": np.full(n, customer, dtype=np.int64),
        "terminal_id": rng.choice(n_terminals, size=n, replace=False).astype(np.int64),
        "amount": np.round(amounts, 2),
        "event_time_us": start_us + offsets_us,
    }


def _card_testing_bursts(population: Population, config: SimulatorConfig) -> pd.DataFrame:
    """``CARD_TESTING_BURSTS_PER_DAY`` bursts a day on random cards that transact, each
    starting at a uniform time of its day (bots do not keep office hours) and ending inside it."""
    rng = np.random.default_rng([config.seed, _CARD_TESTING_STREAM])
    candidates = np.flatnonzero(population.reach_counts > 0)
    latest_start_s = SECONDS_PER_DAY - CARD_TESTING_DURATION_S[1]
    bursts = []
    for day in range(config.n_days):
        for customer in rng.choice(candidates, size=CARD_TESTING_BURSTS_PER_DAY, replace=False):
            start_s = day * SECONDS_PER_DAY + int(rng.integers(0, latest_start_s))
            bursts.append(
                card_testing_burst(
                    rng, population.n_terminals, int(customer), config.start_us + start_s * US_PER_SECOND
                )
            )
    columns = {name: np.concatenate([b[name] for b in bursts]) for name in bursts[0]}
    return pd.DataFrame(columns)


def _with_card_testing(frame: pd.DataFrame, population: Population, config: SimulatorConfig) -> pd.DataFrame:
    bursts = _card_testing_bursts(population, config)
    bursts["is_fraud"] = np.int8(1)
    bursts["fraud_scenario"] = np.int8(CARD_TESTING_SCENARIO)
    merged = pd.concat([frame.drop(columns="transaction_id"), bursts], ignore_index=True)
    # The Handbook's order (time, then customer); at a tie a burst row comes after the others.
    is_burst = np.arange(len(merged)) >= len(frame)
    order = np.lexsort((is_burst, merged["customer_id"].to_numpy(), merged["event_time_us"].to_numpy()))
    merged = merged.iloc[order].reset_index(drop=True)
    merged.insert(0, "transaction_id", np.arange(len(merged), dtype=np.int64))
    return merged


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


# --- live stream -------------------------------------------------------------------------


@dataclass
class LiveStream:
    """Transactions "now" from the same population as the training set.

    Customers are drawn in proportion to their daily rate, so active cards (the ones the
    online store knows) dominate, as in the dataset. ``fraud_share`` of the events get the
    scenario-3 treatment (amount x5), to give the scorer something to find.

    ``card_gap_s``: a card drawn is not drawn again for this long, and a batch holds only the
    cards free (it may be short). A stream far faster than the history gives every card a
    burst of its own otherwise: at 500 events/s over 5,000 cards each card pays every 10 s,
    and the velocity features rightly call that card testing. 0 (benchmarks): no gap.
    """

    population: Population
    rng: np.random.Generator
    fraud_share: float = 0.01
    card_gap_s: float = 0.0
    _next_id: int = 0
    _free_at_us: np.ndarray | None = None  # per customer: when it may be drawn again (card_gap_s)

    @classmethod
    def create(
        cls, seed: int = 0, config: SimulatorConfig | None = None, fraud_share: float = 0.01, card_gap_s: float = 0.0
    ) -> LiveStream:
        config = config or SimulatorConfig(seed=seed)
        rng = np.random.default_rng(config.seed)
        population = make_population(config, rng)
        # A separate stream of randomness for the events, derived from the seed.
        return cls(population, np.random.default_rng([config.seed, 1]), fraud_share, card_gap_s)

    def sustainable_rate(self) -> float:
        """Events a second this stream can give with its card gap (infinite without one)."""
        if not self.card_gap_s:
            return float("inf")
        return self._drawable().astype(bool).sum() / self.card_gap_s

    def _drawable(self) -> np.ndarray:
        p = self.population
        return p.mean_daily_tx * (p.reach_counts > 0)

    def _draw_customers(self, n: int, now_us: int) -> np.ndarray:
        weights = self._drawable()
        if not self.card_gap_s:
            return self.rng.choice(self.population.n_customers, size=n, p=weights / weights.sum())
        if self._free_at_us is None:
            self._free_at_us = np.zeros(self.population.n_customers, dtype=np.int64)
        weights = weights * (self._free_at_us <= now_us)
        n = min(n, int(np.count_nonzero(weights)))
        if n == 0:
            return np.empty(0, dtype=np.int64)
        drawn = self.rng.choice(self.population.n_customers, size=n, replace=False, p=weights / weights.sum())
        self._free_at_us[drawn] = now_us + int(self.card_gap_s * US_PER_SECOND)
        return drawn

    def batch_arrays(self, n: int, now_us: int | None = None) -> dict[str, np.ndarray]:
        """Up to ``n`` events as columns (the fast path for benchmarks; fewer only where the
        card gap leaves fewer cards free)."""
        p = self.population
        now = time.time_ns() // 1000 if now_us is None else now_us
        customers = self._draw_customers(n, now)
        n = len(customers)
        amounts = _draw_amounts(p, customers, self.rng)
        boosted = self.rng.random(n) < self.fraud_share
        amounts[boosted] = np.round(amounts[boosted] * CUSTOMER_FRAUD_AMOUNT_FACTOR, 2)
        ids = np.arange(self._next_id, self._next_id + n)
        self._next_id += n
        return {
            "transaction_id": ids,
            "customer_id": customers.astype(np.int64),
            "terminal_id": _pick_terminals(p, customers, self.rng),
            "amount": amounts,
            "event_time_us": np.full(n, now, dtype=np.int64),
        }

    def batch(self, n: int, now_us: int | None = None) -> list[Transaction]:
        return self._transactions(self.batch_arrays(n, now_us))

    def card_testing_burst(self, customer: int | None = None, start_us: int | None = None) -> list[Transaction]:
        """A scenario-4 burst (``card_testing_burst``) on ``customer``'s card (default: a random
        card that transacts) from ``start_us`` (default now), for demos and tests of the burst."""
        p = self.population
        if customer is None:
            customer = int(self.rng.choice(np.flatnonzero((p.reach_counts > 0) & (p.mean_daily_tx > 0))))
        start = time.time_ns() // 1000 if start_us is None else start_us
        cols = card_testing_burst(self.rng, p.n_terminals, customer, start)
        n = len(cols["amount"])
        cols["transaction_id"] = np.arange(self._next_id, self._next_id + n)
        self._next_id += n
        return self._transactions(cols)

    @staticmethod
    def _transactions(cols: dict[str, np.ndarray]) -> list[Transaction]:
        return [
            Transaction(transaction_id=f"live-{i}", customer_id=c, terminal_id=t, amount=a, event_time_us=ts)
            for i, c, t, a, ts in zip(
                cols["transaction_id"].tolist(),
                cols["customer_id"].tolist(),
                cols["terminal_id"].tolist(),
                cols["amount"].tolist(),
                cols["event_time_us"].tolist(),
            )
        ]


def stream_transactions(
    seed: int = 0, config: SimulatorConfig | None = None, fraud_share: float = 0.01, chunk: int = 1024
) -> Iterator[Transaction]:
    """An endless iterator of live events, each stamped with the time it is handed out."""
    stream = LiveStream.create(seed, config, fraud_share)
    while True:
        cols = stream.batch_arrays(chunk, now_us=0)
        for i, c, t, a in zip(
            cols["transaction_id"].tolist(),
            cols["customer_id"].tolist(),
            cols["terminal_id"].tolist(),
            cols["amount"].tolist(),
        ):
            yield Transaction(
                transaction_id=f"live-{i}", customer_id=c, terminal_id=t, amount=a, event_time_us=time.time_ns() // 1000
            )
