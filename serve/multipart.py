"""``multipart/form-data`` request bodies read as they arrive: each file is handed to a check as soon as its part is
complete, so a request whose first images already break a limit (too many images, too many pixels together, an image
too costly to decode) is refused without reading the rest of its body: 400 KB of a 64-image bomb, not 8 MB. Files
stay in memory (the body is at most --max-body-mb, and it counts against the buffer budget as it arrives); form fields
that are not files are ignored, as before.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request

from serve.errors import ApiError

try:
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart < 0.0.13
    from multipart.exceptions import MultipartParseError
    from multipart.multipart import MultipartParser, parse_options_header

MAX_FIELDS = 64  # parts that are not files, before the body is refused


class _Reader:
    def __init__(self) -> None:
        self.done: list[bytes] = []  # files completed since the caller last took them
        self.fields = 0
        self._name, self._value, self._disposition = b"", b"", b""
        self._data: bytearray | None = None  # the current part's bytes, when it is a file

    def on_part_begin(self) -> None:
        self._disposition, self._data = b"", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._name.lower() == b"content-disposition":
            self._disposition = self._value
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"filename" in options:
            self._data = bytearray()
        else:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise ApiError(413, "too_many_fields", f"more than {MAX_FIELDS} form fields that are not files")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is not None:
            self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._data is not None:
            self.done.append(bytes(self._data))
            self._data = None


async def read_files(request: Request, check: Callable[[int, bytes], None]) -> list[bytes]:
    """The files of a multipart body in order, each passed to ``check(index, data)`` as soon as it is complete."""
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "invalid_multipart", "multipart/form-data without a boundary parameter")
    reader, files = _Reader(), []
    parser = MultipartParser(boundary, {name: getattr(reader, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_part_end")})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            for data in reader.done:
                check(len(files), data)
                files.append(data)
            reader.done.clear()
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "invalid_multipart", f"the multipart body is malformed: {exc}") from exc
    if not files:
        raise ApiError(400, "no_images", "the multipart body holds no files")
    return files
