"""Settings: defaults, the LENSSERVE_ environment, and refusal of nonsense."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.cpu import available_cores
from service.settings import DEFAULT_MODELS_DIR, MiB, Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No LENSSERVE_* variable from the developer's shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("LENSSERVE_"):
            monkeypatch.delenv(name)


def test_defaults_match_the_documented_service_contract():
    settings = Settings()
    assert settings.models_dir == DEFAULT_MODELS_DIR
    assert (DEFAULT_MODELS_DIR / "lens_classifier.json").is_file()
    assert settings.device == "auto"
    assert settings.max_body_bytes == 32 * MiB
    assert settings.max_files == 256
    assert settings.default_samples == 100 and settings.max_samples == 1000
    assert settings.max_masked_fraction == 0.25
    # Two batches at once (one on a single core), sharing the cores without oversubscribing.
    assert settings.resolved_model_instances == min(2, available_cores())
    assert settings.resolved_intra_op_threads == max(
        1, available_cores() // min(2, available_cores())
    )
    assert settings.resolved_model_instances * settings.resolved_intra_op_threads <= max(
        available_cores(), 1
    )
    assert settings.resolved_decode_threads == available_cores()  # worker processes


def test_values_come_from_prefixed_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSSERVE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("LENSSERVE_DEVICE", "cpu")
    monkeypatch.setenv("LENSSERVE_MAX_BATCH_WAIT_S", "0.01")
    monkeypatch.setenv("LENSSERVE_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("LENSSERVE_INTRA_OP_THREADS", "3")
    monkeypatch.setenv("MAX_FILES", "7")  # no prefix: ignored
    settings = Settings()
    assert settings.models_dir == Path(tmp_path)
    assert settings.device == "cpu"
    assert settings.max_batch_wait_s == pytest.approx(0.01)
    assert settings.max_body_bytes == 4096
    assert settings.resolved_intra_op_threads == 3
    assert settings.max_files == 256


def test_one_model_instance_gets_every_core_and_explicit_threads_win(monkeypatch):
    monkeypatch.setenv("LENSSERVE_MODEL_INSTANCES", "1")
    settings = Settings()
    assert settings.resolved_model_instances == 1
    assert settings.resolved_intra_op_threads == available_cores()
    explicit = Settings(model_instances=3, intra_op_threads=2)
    assert (explicit.resolved_model_instances, explicit.resolved_intra_op_threads) == (3, 2)


def test_explicit_arguments_override_the_environment(monkeypatch):
    monkeypatch.setenv("LENSSERVE_MAX_FILES", "7")
    assert Settings(max_files=9).max_files == 9


@pytest.mark.parametrize(
    "field, value",
    [
        ("device", "tpu"),
        ("max_batch_size", 0),
        ("max_batch_wait_s", -0.1),
        ("max_batch_wait_s", 5.0),
        ("max_body_bytes", 10),
        ("max_files", 0),
        ("max_masked_fraction", 1.5),
        ("max_samples", 0),
        ("intra_op_threads", -1),
        ("model_instances", -1),
        ("model_instances", 65),
        ("log_level", "chatty"),
    ],
)
def test_nonsense_values_are_rejected(field, value):
    with pytest.raises(ValidationError) as info:
        Settings(**{field: value})
    assert field in str(info.value)


def test_inconsistent_combinations_are_rejected():
    with pytest.raises(ValidationError, match="default_samples"):
        Settings(default_samples=500, max_samples=100)
    with pytest.raises(ValidationError, match="max_files"):
        Settings(max_files=300, max_queue_cutouts=256)


def test_every_field_documents_its_unit():
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no docstring"
        assert "(" in field.description and ")" in field.description, f"{name}: no unit"


def test_settings_are_frozen():
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.max_files = 3  # type: ignore[misc]
