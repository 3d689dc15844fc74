"""Reading a whole request body without ever holding more than the limit."""

from fastapi import Request

from service.errors import PayloadTooLargeError


async def read_capped_body(request: Request, limit_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit_bytes`` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise PayloadTooLargeError(f"the body is {declared} bytes; at most {limit_bytes} accepted")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit_bytes:
            raise PayloadTooLargeError(f"the body passed {limit_bytes} bytes, the most accepted")
        chunks.append(chunk)
    return b"".join(chunks)
