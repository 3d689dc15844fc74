"""``lensserve bench``: the throughput table of docs/performance.md."""
