"""The ``lensserve`` command line: argument checks that fail before uvicorn starts."""

from __future__ import annotations

import os

import pytest

from service.cli import build_parser, main


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No LENSSERVE_* variables in, and none left behind: ``serve`` exports some."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("LENSSERVE_"):
            monkeypatch.delenv(name)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_serve_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.workers, args.models_dir) == ("127.0.0.1", 8000, 1, None)


def test_a_missing_models_folder_stops_serve_with_status_2(tmp_path, capsys):
    assert main(["serve", "--models-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_invalid_environment_stops_serve_with_status_2(monkeypatch, capsys):
    monkeypatch.setenv("LENSSERVE_MAX_FILES", "0")
    assert main(["serve"]) == 2
    assert "max_files" in capsys.readouterr().err


def test_workers_must_be_positive():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--workers", "0"])


def test_a_command_is_required():
    with pytest.raises(SystemExit):
        main([])
