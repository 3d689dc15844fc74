"""The cores this process may use, and letting decoding yield them to onnxruntime.

onnxruntime's convolutions and matrix products split their work statically
across its intra-op threads, so an operator ends only when its slowest thread
does: a decode thread that takes a core from one of them stalls the whole
batch while the other threads sleep. Decode threads and decode worker
processes therefore run at a higher nice value; they still get every cycle
onnxruntime leaves idle (between operators and batches), so decoding keeps up.
"""

from __future__ import annotations

import os
import sys
import threading

#: Highest nice value Linux allows.
MAX_NICE = 19


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and cgroup pinning)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - sched_getaffinity is Linux-only
        return max(os.cpu_count() or 1, 1)


def lower_current_thread_priority(niceness: int) -> None:
    """Add ``niceness`` to the calling thread's nice value (capped at 19).

    Linux keeps a nice value per thread (``setpriority`` on the thread id);
    elsewhere, where it would apply to the whole process, this does nothing.
    Raising one's own nice value needs no privilege.
    """
    if niceness <= 0 or sys.platform != "linux":
        return
    thread_id = threading.get_native_id()
    current = os.getpriority(os.PRIO_PROCESS, thread_id)
    os.setpriority(os.PRIO_PROCESS, thread_id, min(current + niceness, MAX_NICE))


def current_thread_nice() -> int:
    """The calling thread's nice value (Linux), else the process's."""
    target = threading.get_native_id() if sys.platform == "linux" else 0
    return os.getpriority(os.PRIO_PROCESS, target)
