"""``lensserve bench``: the table's rows come out of a tiny run; the report's ratios."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.bench.run import (
    EXPLAIN_ROW,
    FITS_TO_JSON_ROW,
    FLOOR_ROW,
    FULL_ROW,
    BenchReport,
    BenchRow,
    flood_row,
    format_report,
    http_row,
    multipart_body,
)

REPO = Path(__file__).resolve().parents[2]


def test_format_report_prints_every_row_and_the_target_ratios():
    report = BenchReport(
        rows=[
            BenchRow(FLOOR_ROW, 1000.0),
            BenchRow(FULL_ROW, 600.0),
            BenchRow(EXPLAIN_ROW, 75.0),
            BenchRow(FITS_TO_JSON_ROW, 500.0),
            BenchRow("(c) HTTP multipart", 400.0, p50_ms=10.0, p95_ms=20.0, p99_ms=30.0),
            BenchRow("(d) HTTP single @64", 300.0, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0),
            BenchRow("(e) Keras predict/cutout", 10.0),
        ],
        provider="CPUExecutionProvider",
        cores=2,
        server_peak_rss_mib=300.0,
        server_steady_rss_mib=250.0,
        server_tree_peak_rss_mib=700.0,
        server_tree_steady_pss_mib=450.0,
        client_cpu_fraction=0.05,
    )
    text = format_report(report)
    # Targets from the rows above: (b)/(a) 600/1000; the HTTP rows over (b'), which also
    # decodes FITS: 400/500 and 300/500; (c)/(e) 400/10.
    for expected in (
        "(b)/(a) = 0.60",
        "(c)/(b') = 0.80",
        "(d@max)/(b') = 0.60",
        "(c)/(e) = 40.00",
        "(b)/(h) = 8.00",  # 600/75
    ):
        assert expected in text
    # The ratios with FITS decode on one side only are printed too: 500/1000, 400/600, 300/600.
    assert "(b')/(a) = 0.50, (c)/(b) = 0.67, (d@max)/(b) = 0.50" in text
    assert all(row.name in text for row in report.rows)
    assert "peak 300 MiB" in text
    assert "steady PSS 450 MiB, sum of peak RSS 700 MiB" in text


def test_an_http_row_counts_every_rounds_cutouts_over_their_time():
    timing = {"p50_us": 1000, "p95_us": 2000, "p99_us": 9000}
    rounds = [
        {"ok": 10, "refused": 0, "duration_us": 2e6, **timing},
        {
            "ok": 30,
            "refused": 0,
            "duration_us": 3e6,
            "p50_us": 3000,
            "p95_us": 4000,
            "p99_us": 5000,
        },
        {
            "ok": 20,
            "refused": 0,
            "duration_us": 5e6,
            "p50_us": 2000,
            "p95_us": 3000,
            "p99_us": 4000,
        },
    ]
    row = http_row("(c) HTTP multipart", rounds, per_request=64, connections=2)
    # 60 requests of 64 cutouts in 10 s; latency: the median of the rounds' percentiles.
    assert row.cutouts_per_s == 60 * 64 / 10.0
    assert (row.p50_ms, row.p95_ms, row.p99_ms) == (2.0, 3.0, 5.0)
    assert row.note == "64 file(s)/request, 2 client(s), 3 rounds"
    assert row.refused_per_s == 0.0
    single = http_row("(d) HTTP single @1", rounds[:1], per_request=1, connections=1)
    assert single.cutouts_per_s == 5.0 and single.p99_ms == 9.0
    assert single.note == "1 file(s)/request, 1 client(s)"
    # Refused requests are no cutouts: 8 answered and 4 refused in 2 s.
    refusing = http_row(
        "(d) HTTP single @64", [{**rounds[0], "ok": 8, "refused": 4}], per_request=1, connections=64
    )
    assert refusing.cutouts_per_s == 4.0 and refusing.refused_per_s == 2.0
    assert refusing.note == "1 file(s)/request, 64 client(s), 4 refused (503)"


def test_the_flood_row_reports_goodput_refusals_errors_and_the_p99_of_the_200s():
    figures = {
        "requests": 5000,
        "ok": 1000,
        "refused": 3990,
        "other": 0,
        "socket_errors": 10,
        "duration_us": 10e6,
        "p50_us": 900,
        "p95_us": 300_000,
        "p99_us": 1_200_000,
        "p99_ok_us": 1_500_000,
    }
    row = flood_row(figures, connections=256)
    # 1000 single-cutout 200s and 3990 503s in 10 s.
    assert row.name == "(g) HTTP flood @256"
    assert row.cutouts_per_s == 100.0 and row.refused_per_s == 399.0
    assert row.p99_ms == 1500.0 and row.p50_ms is None
    assert row.socket_errors == 10
    report = BenchReport(
        rows=[BenchRow("(d) HTTP single @64", 125.0, refused_per_s=0.0), row],
        max_queue_wait_s=2.0,
    )
    text = format_report(report)
    assert "(d@max) refused 0.0/s (target 0)" in text
    # 100 / 125 cutouts/s; the bound is the 2 s deadline plus 1 s.
    assert "(g)/(d@max) = 0.80 (target >= 0.8)" in text
    assert "socket errors and other answers 10 (target 0)" in text
    assert "p99 of the 200s 1500 ms (target <= 3000" in text


def test_multipart_body_holds_each_file_under_the_files_field():
    body = multipart_body([b"SIMPLE-1", b"SIMPLE-2"])
    assert body.count(b'name="files"') == 2
    assert b"SIMPLE-1" in body and b"SIMPLE-2" in body
    assert body.endswith(b"--\r\n")


@pytest.mark.slow
def test_lensserve_bench_with_tiny_settings_prints_the_table(tmp_path: Path):
    if shutil.which("wrk") is None:
        pytest.skip("the HTTP rows need wrk on PATH (apt-get install wrk)")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "bench",
            "--models-dir",
            str(REPO / "models"),
            "--batch-size",
            "2",
            "--samples",
            "4",
            "--concurrency",
            "1",
            "2",
            "--duration-s",
            "0.5",
            "--warmup-s",
            "1",
            "--rounds",
            "2",
            "--keras-cutouts",
            "0",
            "--flood-connections",
            "8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    # (c) and the most concurrent (d) alternate with the in-process rows; (d@1) runs once.
    assert next(ln for ln in lines if ln.startswith("(c) HTTP")).endswith("2 rounds")
    assert next(ln for ln in lines if ln.startswith("(d) HTTP single @2")).endswith("2 rounds")
    assert next(ln for ln in lines if ln.startswith("(d) HTTP single @1")).endswith("client(s)")
    names = [ln.split("  ")[0] for ln in lines if ln.startswith("(")]
    assert names.index("(d) HTTP single @1") < names.index("(d) HTTP single @2")
    for row in (
        FLOOR_ROW,
        FULL_ROW,
        EXPLAIN_ROW,
        FITS_TO_JSON_ROW,
        "(c) HTTP multipart",
        "(d) HTTP single @1",
        "(d) HTTP single @2",
        "(f) HTTP one request",
        "(g) HTTP flood @8",
        "(d@max) refused",
        "p99 of the 200s",
        "provider CPUExecutionProvider",
        "server RSS: peak",
        "server + decode worker processes: steady PSS",
    ):
        assert row in completed.stdout
