"""PoolConfig, RetryPolicy and TopicConfig: defaults, validation, backoff arithmetic."""

from __future__ import annotations

import random
from typing import Any

import pytest

import keyedbus


def test_defaults_match_the_design() -> None:
    pool = keyedbus.PoolConfig()
    assert (pool.workers, pool.queue_size, pool.wait_timeout, pool.handler_timeout) == (256, 1000, 0.5, None)
    retry = keyedbus.RetryPolicy()
    assert (retry.max_attempts, retry.initial_backoff, retry.max_backoff, retry.multiplier, retry.jitter) == (
        5,
        0.1,
        10.0,
        2.0,
        0.1,
    )
    topic = keyedbus.TopicConfig()
    assert (topic.persistence, topic.replicas, topic.max_msgs) == ("persistent", 1, None)


@pytest.mark.parametrize(
    ("cls", "fields", "message"),
    [
        (keyedbus.PoolConfig, {"workers": 0}, r"^PoolConfig\.workers must be >= 1, got 0$"),
        (keyedbus.PoolConfig, {"queue_size": -1}, r"^PoolConfig\.queue_size must be >= 1, got -1$"),
        (
            keyedbus.PoolConfig,
            {"wait_timeout": -0.1},
            r"^PoolConfig\.wait_timeout must be finite and >= 0, got -0\.1$",
        ),
        (
            keyedbus.PoolConfig,
            {"handler_timeout": 0},
            r"^PoolConfig\.handler_timeout must be finite and > 0 \(or None for no limit\), got 0$",
        ),
        (
            keyedbus.PoolConfig,
            {"wait_timeout": float("inf")},
            r"^PoolConfig\.wait_timeout must be finite .*$",
        ),
        (keyedbus.RetryPolicy, {"max_attempts": 0}, r"^RetryPolicy\.max_attempts must be >= 1, got 0$"),
        (
            keyedbus.RetryPolicy,
            {"multiplier": 0.5},
            r"^RetryPolicy\.multiplier must be finite and >= 1, got 0\.5$",
        ),
        (
            keyedbus.RetryPolicy,
            {"initial_backoff": 5.0, "max_backoff": 1.0},
            r"^RetryPolicy\.max_backoff \(1\.0\) must be >= initial_backoff \(5\.0\)$",
        ),
        (
            keyedbus.RetryPolicy,
            {"jitter": 1.5},
            r"^RetryPolicy\.jitter is a fraction between 0 and 1, got 1\.5$",
        ),
        (
            keyedbus.TopicConfig,
            {"persistence": "durable"},
            r"^TopicConfig\.persistence must be 'persistent' or 'ephemeral', got 'durable'$",
        ),
        (
            keyedbus.TopicConfig,
            {"max_msgs": 0},
            r"^TopicConfig\.max_msgs must be >= 1 \(or None for no limit\), got 0$",
        ),
        (keyedbus.TopicConfig, {"replicas": 0}, r"^TopicConfig\.replicas must be >= 1, got 0$"),
    ],
)
def test_out_of_range_values_are_refused(cls: type[Any], fields: dict[str, Any], message: str) -> None:
    with pytest.raises(keyedbus.InvalidConfigError, match=message) as info:
        cls(**fields)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("cls", "fields"),
    [
        (keyedbus.PoolConfig, {"workers": "4"}),
        (keyedbus.PoolConfig, {"workers": True}),
        (keyedbus.RetryPolicy, {"initial_backoff": "1"}),
        (keyedbus.TopicConfig, {"max_bytes": 1.5}),
    ],
)
def test_wrong_types_are_refused(cls: type[Any], fields: dict[str, Any]) -> None:
    with pytest.raises(keyedbus.ArgumentTypeError) as info:
        cls(**fields)
    assert isinstance(info.value, TypeError)


def test_configs_are_frozen_and_keyword_only() -> None:
    pool = keyedbus.PoolConfig(workers=4)
    with pytest.raises(AttributeError):
        pool.workers = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        keyedbus.PoolConfig(4)  # type: ignore[call-arg]


def test_backoff_grows_and_caps() -> None:
    policy = keyedbus.RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=0.5, jitter=0)
    assert [policy.backoff(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_jitter_stays_within_its_fraction() -> None:
    policy = keyedbus.RetryPolicy(initial_backoff=1.0, jitter=0.1)
    rng = random.Random(7)
    waits = [policy.backoff(1, rng) for _ in range(1000)]
    assert min(waits) >= 0.9
    assert max(waits) <= 1.1
    assert max(waits) - min(waits) > 0.1  # it does vary
