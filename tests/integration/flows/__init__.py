"""Tests of the use cases in pipeline/flows/ on the real services, with the tiny random model."""

from __future__ import annotations

from typing import Any

from pipeline.config import GateSettings, ModelSettings, PolicySettings, Settings, TrainingSettings
from tests.integration.helpers import fresh_topics

#: Training the tiny model learns a user's style from in 30 steps (it needs the large learning rate): the gate
#: promotes what it trains.
TRAIN = TrainingSettings(learning_rate=0.05, max_steps=30, val_fraction=0, rank=4, batch_size=8, threads=1)


def flow_settings(services: Any) -> Settings:
    """A flows test module's settings: the test services, topics of its own, the tiny model, `TRAIN`, 60 s leases."""
    return Settings(
        services.db,
        services.s3,
        fresh_topics(services.kafka),
        ModelSettings(base="tiny-random"),
        TRAIN,
        PolicySettings(lease_s=60),
        GateSettings(),
    )
