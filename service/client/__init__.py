"""The pipeline client (:mod:`service.client.client`) and ``lensserve predict``.

``from service.client import LensClient`` is the public import; it needs only httpx.
"""

from service.client.client import (
    BAD_RESPONSE,
    PREDICT_PATH,
    RETRY_STATUSES,
    UNAVAILABLE,
    UNREADABLE_FILE,
    AsyncLensClient,
    ClientStats,
    EinsteinRadius,
    ErrorInfo,
    LensClient,
    LensParameters,
    LensPrediction,
    RetryPolicy,
    batched,
    parse_retry_after,
)

__all__ = [
    "BAD_RESPONSE",
    "PREDICT_PATH",
    "RETRY_STATUSES",
    "UNAVAILABLE",
    "UNREADABLE_FILE",
    "AsyncLensClient",
    "ClientStats",
    "EinsteinRadius",
    "ErrorInfo",
    "LensClient",
    "LensParameters",
    "LensPrediction",
    "RetryPolicy",
    "batched",
    "parse_retry_after",
]
