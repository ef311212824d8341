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

Everything is drawn from one ``numpy.random.Generator`` per seed, population first, so the
same seed gives the same customers and terminals to the training set and to the live stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

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


@dataclass(frozen=True)
class SimulatorConfig:
    """Defaults reproduce the Handbook's dataset size (about 1.75M transactions)."""

    n_customers: int = 5_000
    n_terminals: int = 10_000
    n_days: int = 183
    start_date: date = date(2018, 4, 1)
    radius: float = 5.0
    seed: int = 0

    @property
    def start_us(self) -> int:
        start = datetime(self.start_date.year, self.start_date.month, self.start_date.day, tzinfo=UTC)
        return int(start.timestamp()) * US_PER_SECOND


@dataclass(frozen=True)
class Population:
    """Customer profiles and, per customer, the terminals in reach (CSR layout)."""

    mean_amount: np.ndarray  # (n_customers,)
    std_amount: np.ndarray
    mean_daily_tx: np.ndarray
    reach_offsets: np.ndarray  # (n_customers + 1,): terminals of c are reach_terminals[o[c]:o[c+1]]
    reach_terminals: np.ndarray

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
    return Population(mean_amount, mean_amount / 2, mean_daily_tx, offsets, terminals)


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
    return frame.drop(columns="day")


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
    """

    population: Population
    rng: np.random.Generator
    fraud_share: float = 0.01
    _next_id: int = 0

    @classmethod
    def create(cls, seed: int = 0, config: SimulatorConfig | None = None, fraud_share: float = 0.01) -> LiveStream:
        config = config or SimulatorConfig(seed=seed)
        rng = np.random.default_rng(config.seed)
        population = make_population(config, rng)
        # A separate stream of randomness for the events, derived from the seed.
        return cls(population, np.random.default_rng([config.seed, 1]), fraud_share)

    def batch_arrays(self, n: int, now_us: int | None = None) -> dict[str, np.ndarray]:
        """``n`` events as columns (the fast path for benchmarks)."""
        p = self.population
        weights = p.mean_daily_tx * (p.reach_counts > 0)
        customers = self.rng.choice(p.n_customers, size=n, p=weights / weights.sum())
        amounts = _draw_amounts(p, customers, self.rng)
        boosted = self.rng.random(n) < self.fraud_share
        amounts[boosted] = np.round(amounts[boosted] * CUSTOMER_FRAUD_AMOUNT_FACTOR, 2)
        ids = np.arange(self._next_id, self._next_id + n)
        self._next_id += n
        now = time.time_ns() // 1000 if now_us is None else now_us
        return {
            "transaction_id": ids,
            "customer_id": customers.astype(np.int64),
            "terminal_id": _pick_terminals(p, customers, self.rng),
            "amount": amounts,
            "event_time_us": np.full(n, now, dtype=np.int64),
        }

    def batch(self, n: int, now_us: int | None = None) -> list[Transaction]:
        cols = self.batch_arrays(n, now_us)
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
