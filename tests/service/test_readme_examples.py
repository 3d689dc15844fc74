"""The README's shell and Python blocks run as written, from the repository root, on a live server.

Every ```sh and ```python block of README.md runs unless it is named in
:data:`NOT_RUN` with the reason, so a new block is tested by default. The
blocks call ``make serve``'s address, http://127.0.0.1:8000; the test's server
listens on a free port, and that address is the one thing replaced in a block.
Blocks run in a folder that links every top-level entry of the repository, so
they read ``examples/cutouts`` and ``models`` as from the root while the files
they write (``scores.csv``) stay out of the checkout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
#: Where the README's examples expect the server: ``make serve``'s default address.
README_URL = "http://127.0.0.1:8000"
#: Blocks that cannot run in a test, by the start of their first line, and why.
NOT_RUN = {
    "make serve ": "starts a server that runs until stopped, and `make test` is this test suite",
    "LENSSERVE_API_KEYS=": "starts servers with `make serve` (its settings are checked below)",
}
#: Longest a block may take (seconds); the slowest, 12 cutouts with 200 MC draws, takes ~2 s.
BLOCK_TIMEOUT_S = 120
BLOCKS = re.findall(r"^```(sh|python)\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)
#: The README's example answer, and the request that gives it.
RESPONSE_EXAMPLE = re.search(r"^```json\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)
RESPONSE_REQUEST = ("examples/cutouts/clean/00000.fits", {"samples": 100, "seed": 42})


def _skip_reason(code: str) -> str | None:
    first_line = code.splitlines()[0]
    return next((why for start, why in NOT_RUN.items() if first_line.startswith(start)), None)


def _block_id(block: tuple[str, str]) -> str:
    language, code = block
    return f"{language}:{code.splitlines()[0][:50]}"


@pytest.fixture(scope="module")
def root_copy(tmp_path_factory) -> Path:
    """A folder of links to the repository's top-level entries: the root, writes kept apart."""
    folder = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name != ".git":
            (folder / entry.name).symlink_to(entry)
    return folder


def test_the_readme_has_blocks_to_run_and_every_skip_names_one():
    assert len(BLOCKS) >= 8, "the README's examples were not found"
    for start in NOT_RUN:
        named = [code for _, code in BLOCKS if code.splitlines()[0].startswith(start)]
        assert len(named) == 1, f"NOT_RUN entry {start!r} names {len(named)} blocks"


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_the_block_runs_as_written(block, live_server, root_copy):
    language, code = block
    reason = _skip_reason(code)
    if reason is not None:
        pytest.skip(f"not run: {reason}")
    addresses = set(re.findall(r"https?://(?:127\.0\.0\.1|localhost)[:/\w]*", code))
    assert all(re.fullmatch(rf"{re.escape(README_URL)}(/[/\w]*)?", a) for a in addresses), addresses
    code = code.replace(README_URL, live_server)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LENSSERVE_")}
    # `python` and `lensserve` as installed beside the interpreter running the tests.
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    command = (
        ["bash", "-euo", "pipefail", "-c", code]
        if language == "sh"
        else [
            sys.executable,
            "-c",
            code,
        ]
    )
    result = subprocess.run(
        command,
        cwd=root_copy,
        env=environment,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.strip(), "the block printed nothing"
    # Every file of the examples is a good one: no result carries an error (the Python
    # examples print "failed:" for one, `lensserve predict` exits with 1).
    assert "failed:" not in result.stdout, output
    assert not re.search(r'"error":\s*\{', result.stdout), output


def test_the_settings_in_the_readme_are_accepted(monkeypatch):
    assignments = re.findall(r"\b(LENSSERVE_[A-Z_]+)=(\S+)", "".join(c for _, c in BLOCKS))
    assert assignments, "the README shows how to set a setting"
    for name, value in assignments:
        assert name.removeprefix("LENSSERVE_").lower() in Settings.model_fields, name
        monkeypatch.setenv(name, value)
        Settings()  # raises on a value the server would refuse at start-up
        monkeypatch.delenv(name)


def _numbers(value: object, path: str = "") -> dict[str, object]:
    """Leaves of a JSON document by their path ("results.0.wcs.ra")."""
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in _numbers(item, f"{path}.{key}").items()
        }
    if isinstance(value, list):
        return {
            k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{path}.{i}").items()
        }
    return {path: value}


@pytest.mark.slow
def test_the_response_example_is_what_the_server_answers(live_server):
    assert RESPONSE_EXAMPLE is not None
    shown = _numbers(json.loads(RESPONSE_EXAMPLE.group(1)))
    path, params = RESPONSE_REQUEST
    response = httpx.post(
        f"{live_server}/v1/predict",
        content=(REPO / path).read_bytes(),
        params=params,
        headers={"content-type": "application/fits"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answered = _numbers(response.json())
    assert shown.keys() == answered.keys()
    for key, value in shown.items():
        if isinstance(value, float):
            # The README rounds to 3 decimals (RA/Dec to 5): half a last digit, and float jitter.
            digits = 5 if key.endswith((".ra", ".dec")) else 3
            assert answered[key] == pytest.approx(value, abs=0.6 * 10**-digits), key
        else:
            assert answered[key] == value, key
