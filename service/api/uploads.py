"""Request bodies: one capped reader, the multipart parser, and the files of a request.

Every body the service reads goes through :func:`stream_capped_body`, so no
client can make it buffer more than the configured limit, whether the body
declares its length or not.
"""

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.core.decode_pool import Upload
from service.errors import (
    BandMismatchError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from service.fits.raw import RAW_FITS_MEDIA_TYPES

MULTIPART_MEDIA_TYPE = "multipart/form-data"
#: Form field that carries the files of a multipart request.
FILES_FIELD = "files"
#: Name reported for the file of a raw (non-multipart) request without a Content-Disposition.
RAW_BODY_FILENAME = "body"

#: OpenAPI description of the body of ``POST /v1/predict``.
PREDICT_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One FITS file as the raw body (optionally gzip-compressed, or sent "
        "with `Content-Encoding: gzip`), or several in the multipart field `files`, or one "
        "object as one file per band in the multipart fields named after the model's bands "
        "(`g`, `r`, `i`), answered as one result.",
        "content": {
            **{
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in RAW_FITS_MEDIA_TYPES
            },
            MULTIPART_MEDIA_TYPE: {
                "schema": {
                    "type": "object",
                    "required": [FILES_FIELD],
                    "properties": {
                        FILES_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "FITS cutouts (g, r, i); answered in this order.",
                        },
                        **{
                            band: {
                                "type": "string",
                                "format": "binary",
                                "description": f"The {band}-band file of one object "
                                "(instead of `files`).",
                            }
                            for band in ("g", "r", "i")
                        },
                    },
                }
            },
        },
    }
}


async def stream_capped_body(request: Request, limit_bytes: int) -> AsyncIterator[bytes]:
    """Yield the body's chunks, refusing it as soon as it passes ``limit_bytes``.

    A declared Content-Length over the limit is refused before anything is
    read; a chunked or lying body is refused the moment the running total
    passes the limit, so a client cannot make the server buffer more than
    ``limit_bytes``.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequestError(f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit_bytes:
            raise PayloadTooLargeError(
                f"the body is {int(declared)} bytes; at most {limit_bytes} bytes are accepted"
            )
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit_bytes:
            raise PayloadTooLargeError(
                f"the body passed {limit_bytes} bytes, the most accepted; send fewer or "
                "smaller files per request"
            )
        if chunk:
            yield chunk


async def read_capped_body(request: Request, limit_bytes: int) -> bytes:
    """The whole body, under the limit of :func:`stream_capped_body` (bytes)."""
    return b"".join([chunk async for chunk in stream_capped_body(request, limit_bytes)])


async def read_uploads(
    request: Request,
    *,
    max_body_bytes: int,
    max_files: int,
    band_fields: Sequence[str] = (),
) -> list[Upload]:
    """The files of a request: one raw FITS body, or the ``files`` of a multipart form, or
    its per-band files (``Upload.band`` set), in the order received.

    Parameters
    ----------
    request : Request
        The request whose body is read.
    max_body_bytes : int
        Largest body accepted, counted while it streams in (bytes).
    max_files : int
        Most files in a multipart form (files).
    band_fields : sequence of str
        The model's bands: multipart fields of these names carry one object's per-band
        files (see :func:`band_uploads`).
    """
    header = request.headers.get("content-type") or RAW_FITS_MEDIA_TYPES[-1]
    media_type, options = parse_options_header(header)
    media = media_type.decode("latin-1").lower()
    if media == MULTIPART_MEDIA_TYPE:
        return await _read_multipart(
            request,
            options,
            max_body_bytes=max_body_bytes,
            max_files=max_files,
            band_fields=tuple(band_fields),
        )
    if media in RAW_FITS_MEDIA_TYPES:
        return await _read_raw_body(request, max_body_bytes=max_body_bytes)
    raise UnsupportedMediaTypeError(
        f"got Content-Type {media!r}; send one FITS file as "
        f"{', '.join(RAW_FITS_MEDIA_TYPES)} or several as {MULTIPART_MEDIA_TYPE} "
        f"in the field {FILES_FIELD!r}"
    )


def _content_disposition_filename(value: str | None) -> str | None:
    if not value:
        return None
    _, options = parse_options_header(value)
    name = options.get(b"filename")
    return name.decode("utf-8", "replace") if name else None


async def _read_raw_body(request: Request, *, max_body_bytes: int) -> list[Upload]:
    encoding = request.headers.get("content-encoding", "").strip().lower() or None
    if encoding not in (None, "identity", "gzip", "x-gzip"):
        raise UnsupportedMediaTypeError(
            f"got Content-Encoding {encoding!r}; accepted: gzip or none"
        )
    data = await read_capped_body(request, max_body_bytes)
    filename = (
        _content_disposition_filename(request.headers.get("content-disposition"))
        or RAW_BODY_FILENAME
    )
    return [
        Upload(
            filename=filename,
            data=data,
            content_encoding=None if encoding in (None, "identity") else "gzip",
        )
    ]


class _MultipartCollector:
    """Callbacks for python-multipart that keep each part of field ``files`` in memory."""

    def __init__(self, max_files: int, band_fields: tuple[str, ...] = ()) -> None:
        self.max_files = max_files
        self.band_fields = band_fields
        self._field = FILES_FIELD
        self.uploads: list[Upload] = []
        self.ended = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._chunks = []

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        self._headers[name] = self._header_value.decode("latin-1").strip()
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition"))
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        if field_name != FILES_FIELD and field_name not in self.band_fields:
            bands = f", or one object's files in {', '.join(map(repr, self.band_fields))}"
            raise InvalidRequestError(
                f"got a form field named {field_name!r}; send FITS files in the field "
                f"{FILES_FIELD!r}{bands if self.band_fields else ''}"
            )
        self._field = field_name
        if len(self.uploads) >= self.max_files:
            raise PayloadTooLargeError(
                f"got more than {self.max_files} files; at most {self.max_files} are accepted "
                "per request"
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        filename = _content_disposition_filename(self._headers.get("content-disposition"))
        encoding = self._headers.get("content-encoding", "").strip().lower()
        band = None if self._field == FILES_FIELD else self._field
        self.uploads.append(
            Upload(
                filename=filename or (band or f"{FILES_FIELD}[{len(self.uploads)}]"),
                data=b"".join(self._chunks),
                content_encoding="gzip" if encoding in ("gzip", "x-gzip") else None,
                band=band,
            )
        )
        self._chunks = []

    def _end(self) -> None:
        self.ended = True


async def _read_multipart(
    request: Request,
    options: dict[bytes, bytes],
    *,
    max_body_bytes: int,
    max_files: int,
    band_fields: tuple[str, ...] = (),
) -> list[Upload]:
    """Parse a multipart body while it streams in, under the body-size limit."""
    if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise UnsupportedMediaTypeError(
            "a multipart body cannot carry a Content-Encoding; gzip the files inside the form"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequestError("the multipart/form-data Content-Type has no boundary")
    collector = _MultipartCollector(max_files, band_fields)
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        async for chunk in stream_capped_body(request, max_body_bytes):
            parser.write(chunk)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise InvalidRequestError(f"the multipart/form-data body is malformed: {exc}") from exc
    if not collector.ended:
        raise InvalidRequestError("the multipart/form-data body ends before its closing boundary")
    if not collector.uploads:
        raise InvalidRequestError(f"the form holds no file in the field {FILES_FIELD!r}")
    return collector.uploads


def band_uploads(uploads: Sequence[Upload], bands: Sequence[str]) -> list[Upload] | None:
    """One object's per-band files in the order of ``bands``; None when the request sends
    whole files only.

    Raises
    ------
    BandMismatchError
        Whole files and per-band files in one request, or a band missing or sent twice.
    """
    by_band = [upload for upload in uploads if upload.band is not None]
    if not by_band:
        return None
    whole = [upload.filename for upload in uploads if upload.band is None]
    sent = [upload.band for upload in by_band]
    if whole:
        raise BandMismatchError(
            f"got files in {FILES_FIELD!r} ({', '.join(whole)}) and per-band files "
            f"({', '.join(f'{u.band}: {u.filename}' for u in by_band)}) in one request; send "
            f"either whole objects in {FILES_FIELD!r} or one object as one file per band "
            f"({', '.join(bands)})"
        )
    twice = sorted({band for band in sent if sent.count(band) > 1})
    if twice:
        names = ", ".join(f"{u.band}: {u.filename}" for u in by_band if u.band in twice)
        raise BandMismatchError(
            f"got band {', '.join(twice)} twice ({names}); send one file per band "
            f"({', '.join(bands)})"
        )
    missing = [band for band in bands if band not in sent]
    if missing:
        raise BandMismatchError(
            f"got per-band files for {', '.join(b for b in bands if b in sent)}; the model "
            f"needs one for each of {', '.join(bands)} (missing {', '.join(missing)})"
        )
    return sorted(by_band, key=lambda upload: list(bands).index(upload.band or ""))
