"""Multipart forms, read as they stream in: each file part as bytes, each other field as text.

Built on python-multipart, the parser under Starlette's own `request.form()`, with Starlette's
rules (a part with a filename is a file; a name is required; at most so many files and fields)
and its messages. Why not `request.form()` itself: it spools every file into a temporary file
behind an `UploadFile`, which the route then reads back: 42 us against 28 us here for a canvas
drawing's form in a loop, and more on the request path, where the caches are cold (README.md,
"Benchmarks"). Here a file over its limit is also refused as it streams in, before it is held
whole.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from digitops.inference.errors import ImageError, RequestError

# A text field holds an option (a number, a word, a comment): far below this.
MAX_FIELD_BYTES = 64 * 1024


@dataclass
class Upload:
    name: str  # the form field
    filename: str
    data: bytes


@dataclass
class Form:
    files: list[Upload] = field(default_factory=list)
    fields: list[tuple[str, str]] = field(default_factory=list)  # in the order they came


class _Part:
    def __init__(self) -> None:
        self.header_name, self.header_value = b"", b""
        self.disposition = b""
        self.name = ""
        self.filename: str | None = None  # None: a text field
        self.chunks: list[bytes] = []
        self.size = 0


class _FormReader:
    """python-multipart's callbacks, collecting the parts of one form."""

    def __init__(self, charset: str, max_files: int, max_fields: int, max_file_bytes: int):
        self.charset = charset
        self.max_files, self.max_fields = max_files, max_fields
        self.max_file_bytes = max_file_bytes
        self.form = Form()
        self.part = _Part()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def decode(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.part.header_name.lower() == b"content-disposition":
            self.part.disposition = self.part.header_value
        self.part.header_name, self.part.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        if b"name" not in options:
            raise RequestError('The Content-Disposition header field "name" must be provided.')
        self.part.name = self.decode(options[b"name"])
        if b"filename" in options:
            self.part.filename = self.decode(options[b"filename"])
            if len(self.form.files) >= self.max_files:
                raise RequestError(f"Too many files. Maximum number of files is {self.max_files}.")
        elif len(self.form.fields) >= self.max_fields:
            raise RequestError(f"Too many fields. Maximum number of fields is {self.max_fields}.")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        part.size += end - start
        if part.filename is not None and part.size > self.max_file_bytes:
            limit = self.max_file_bytes
            raise ImageError(f"upload '{part.filename}' is over the {limit}-byte limit", 413)
        if part.filename is None and part.size > MAX_FIELD_BYTES:
            raise RequestError(f"form field '{part.name}' is over {MAX_FIELD_BYTES} bytes")
        part.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        part, data = self.part, b"".join(self.part.chunks)
        if part.filename is None:
            self.form.fields.append((part.name, self.decode(data)))
        else:
            self.form.files.append(Upload(part.name, part.filename, data))


async def read_form(
    content_type: str,
    body: AsyncIterator[bytes],
    *,
    max_files: int,
    max_fields: int,
    max_file_bytes: int,
) -> Form:
    """The form in `body` (a multipart/form-data `content_type`). A file over `max_file_bytes`
    is a 413 ImageError; anything else wrong with the form is a 400 RequestError."""
    _, params = parse_options_header(content_type)
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    if b"boundary" not in params:
        raise RequestError("malformed multipart body: Missing boundary in multipart.")
    reader = _FormReader(charset, max_files, max_fields, max_file_bytes)
    try:
        parser = MultipartParser(params[b"boundary"], reader.callbacks())
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except ImageError:
        raise
    except RequestError as err:
        raise RequestError(f"malformed multipart body: {err}") from None
    except FormParserError:
        raise RequestError("malformed multipart body: Invalid multipart data.") from None
    except Exception as err:  # the client went away mid-body, or sent what no parser takes
        raise RequestError(f"malformed multipart body: {err}") from None
    return reader.form
