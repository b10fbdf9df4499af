"""Settings are typed, frozen and validated at start with the variable's name in the error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.config import (
    ConsumerSettings,
    EventSettings,
    IngestSettings,
    KafkaSettings,
    S3Settings,
    Settings,
    TrainingSettings,
)


def test_env_is_read_and_typed(monkeypatch):
    monkeypatch.setenv("PERSONA_INGEST_PORT", "9999")
    monkeypatch.setenv("PERSONA_KAFKA_BOOTSTRAP_SERVERS", "a:1, b:2")
    assert IngestSettings().port == 9999
    assert KafkaSettings().servers == ["a:1", "b:2"]


@pytest.mark.parametrize(
    ("var", "value", "cls"),
    [
        ("PERSONA_INGEST_PORT", "not-a-port", IngestSettings),
        ("PERSONA_INGEST_PORT", "70000", IngestSettings),
        ("PERSONA_EVENTS_HOLDOUT_FRACTION", "1.5", EventSettings),
        ("PERSONA_CONSUMER_FAILPOINT", "everywhere", ConsumerSettings),
    ],
)
def test_bad_values_fail_at_start_naming_the_field(monkeypatch, var, value, cls):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError) as e:
        cls()
    field = var.split("_", 2)[2].lower()
    assert field in str(e.value)


def test_settings_are_frozen_and_secrets_hidden():
    s = S3Settings()
    with pytest.raises(ValidationError):
        s.bucket = "other"
    assert "persona-secret-key" not in repr(s)


def test_settings_take_given_parts():
    k = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    assert Settings(k).kafka is k


def test_micro_batch_budget_is_automatic_per_device_unless_set() -> None:
    auto = TrainingSettings()
    assert auto.micro_batch_tokens == 0
    assert (auto.micro_batch_budget("cpu"), auto.micro_batch_budget("cuda")) == (512, 32768)
    assert TrainingSettings(micro_batch_tokens=4096).micro_batch_budget("cpu") == 4096
    with pytest.raises(ValidationError, match="0 \\(auto\\) or at least 256"):
        TrainingSettings(micro_batch_tokens=100)
