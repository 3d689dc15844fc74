"""The errors lensserve reports to its clients.

Every error the service means to report derives from :class:`LensServeError`.
Each class carries a stable, snake_case machine ``code`` and a message for a
person that says what was received and what is accepted, e.g.
``"got 2 bands (g, r); the model needs g, r, i"``.

The classes know nothing of HTTP: the API layer alone maps them to status
codes and to the JSON body ``{"error": {"code": ..., "message": ...}}``.
Third-party exceptions (astropy, onnxruntime) are wrapped where they are
caught, with ``raise ... from exc`` so the cause stays in the traceback.
"""

from typing import ClassVar


class LensServeError(Exception):
    """Root of the errors the service reports to a client.

    Parameters
    ----------
    message : str
        What was received and what is accepted, for a person to read.

    Attributes
    ----------
    code : str
        Stable machine-readable identifier of the error family (snake_case);
        clients may branch on it, so it never changes once published.
    message : str
        The message given at construction; also ``str(error)``.
    """

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidFitsError(LensServeError):
    """The bytes are not a readable FITS file: not FITS, truncated or corrupt."""

    code: ClassVar[str] = "invalid_fits"


class NoImageDataError(LensServeError):
    """The FITS file holds no usable image: no image HDU with data, or only tables."""

    code: ClassVar[str] = "no_image_data"


class BandMismatchError(LensServeError):
    """The image's bands are not those the model needs: wrong count or unknown names."""

    code: ClassVar[str] = "band_mismatch"


class CutoutTooSmallError(LensServeError):
    """The image is smaller than the model's cutout size (pixels) on at least one axis."""

    code: ClassVar[str] = "cutout_too_small"


class PixelScaleMismatchError(LensServeError):
    """The WCS pixel scale (arcsec/pixel) differs from the model's beyond the tolerance."""

    code: ClassVar[str] = "pixel_scale_mismatch"


class TooManyMaskedPixelsError(LensServeError):
    """More of the cutout is masked (NaN or BLANK) than the service accepts."""

    code: ClassVar[str] = "too_many_masked_pixels"


class PayloadTooLargeError(LensServeError):
    """A body, a decompressed file, a header or an image exceeds a configured limit."""

    code: ClassVar[str] = "payload_too_large"


class UnsupportedMediaTypeError(LensServeError):
    """The content type or content encoding is not one the service reads."""

    code: ClassVar[str] = "unsupported_media_type"


class InvalidRequestError(LensServeError):
    """The request itself is malformed: bad parameters or a broken form."""

    code: ClassVar[str] = "invalid_request"


class ModelUnavailableError(LensServeError):
    """The models are not loaded (starting, shutting down or failed to load)."""

    code: ClassVar[str] = "model_unavailable"


class InferenceError(LensServeError):
    """Running the models failed, or they returned something unusable."""

    code: ClassVar[str] = "inference_failed"


class OverloadedError(LensServeError):
    """The service is at capacity and refuses new work for now; retry later."""

    code: ClassVar[str] = "overloaded"


class UnreadableFileError(LensServeError):
    """An input file of a batch run cannot be read: missing, a folder, or no permission."""

    code: ClassVar[str] = "unreadable_file"


class ModelNotFoundError(LensServeError):
    """A request names a model the service does not serve."""

    code: ClassVar[str] = "model_not_found"


class InvalidBatchInputError(LensServeError):
    """The inputs of a batch run name nothing to score, or a list of paths cannot be read."""

    code: ClassVar[str] = "invalid_batch_input"


class UnauthorizedError(LensServeError):
    """The request carries no API key, or one the service does not know."""

    code: ClassVar[str] = "unauthorized"


class RequestTimeoutError(LensServeError):
    """The request's body did not arrive within the request timeout."""

    code: ClassVar[str] = "request_timeout"
