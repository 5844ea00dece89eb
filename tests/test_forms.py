"""The multipart reader (digitops.inference.forms): the same form as Starlette's parser reads,
the same refusals, and a file over its limit refused before the rest of the body is read."""

import asyncio

import httpx
import pytest
from starlette.datastructures import UploadFile
from starlette.requests import Request

from digitops.inference.errors import ImageError, RequestError
from digitops.inference.forms import MAX_FIELD_BYTES, read_form


def encoded(files=None, data=None) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart form, as httpx (the tests' client) sends it."""
    request = httpx.Request("POST", "http://x/", files=files or {}, data=data)
    return request.headers["content-type"], request.read()


def chunks(body: bytes, size: int):
    async def stream():
        for i in range(0, len(body), size):
            yield body[i : i + size]

    return stream()


def read(content_type, body, size=7, max_files=4, max_fields=8, max_file_bytes=1000):
    return asyncio.run(
        read_form(
            content_type,
            chunks(body, size),
            max_files=max_files,
            max_fields=max_fields,
            max_file_bytes=max_file_bytes,
        )
    )


def starlette_form(content_type: str, body: bytes) -> tuple[list, list]:
    async def parse():
        sent = False

        async def receive():
            nonlocal sent
            sent, first = True, not sent
            return {"type": "http.request", "body": body if first else b"", "more_body": False}

        headers = [(b"content-type", content_type.encode())]
        form = await Request({"type": "http", "headers": headers}, receive).form()
        items = form.multi_items()
        files = [(k, v.filename, await v.read()) for k, v in items if isinstance(v, UploadFile)]
        fields = [(k, v) for k, v in items if isinstance(v, str)]
        return files, fields

    return asyncio.run(parse())


FORMS = [
    {"files": {"image": ("d.png", b"\x89PNG fake bytes\r\n--not a boundary", "image/png")}},
    {
        "files": [("images", ("a.png", b"A" * 300, "image/png")), ("images", ("b.png", b"", "x"))],
        "data": {"noise": "0.2", "invert": "auto"},
    },
    {"files": {"image": ("ünïcode name.png", b"\x00\xff" * 50, "image/png")}, "data": {"c": "é"}},
    {"files": {"other": ("o.bin", b"o", "application/octet-stream")}, "data": {"a": "b"}},
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("size", [1, 7, 65536])
def test_reads_what_starlette_reads(form, size):
    content_type, body = encoded(**form)
    got = read(content_type, body, size=size)
    files, fields = starlette_form(content_type, body)
    assert [(f.name, f.filename, f.data) for f in got.files] == files
    assert got.fields == fields


def test_a_file_over_the_limit_is_refused_as_it_streams():
    content_type, body = encoded(files={"image": ("big.png", b"x" * 5000, "image/png")})
    consumed = 0

    async def stream():
        nonlocal consumed
        for i in range(0, len(body), 100):
            consumed += 100
            yield body[i : i + 100]

    async def parse():
        return await read_form(
            content_type, stream(), max_files=1, max_fields=1, max_file_bytes=1000
        )

    with pytest.raises(ImageError, match="upload 'big.png' is over the 1000-byte limit") as err:
        asyncio.run(parse())
    assert err.value.status == 413
    assert consumed < 1300  # not the whole 5 kB body


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("multipart/form-data", b"--x--", "Missing boundary in multipart"),
        ("multipart/form-data; boundary=x", b"garbage with no boundary", "Invalid multipart data"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; filename="a"\r\n\r\nA\r\n--x--\r\n',
            'field "name" must be provided',
        ),
    ],
)
def test_a_malformed_body_is_a_400_that_says_so(content_type, body, message):
    with pytest.raises(RequestError, match=message) as err:
        read(content_type, body)
    assert err.value.status == 400
    assert str(err.value).startswith("malformed multipart body: ")


def test_too_many_files_fields_or_field_bytes_are_refused():
    files = [("images", (f"{i}.png", b"x", "image/png")) for i in range(5)]
    with pytest.raises(RequestError, match="Too many files. Maximum number of files is 4"):
        read(*encoded(files=files))
    with pytest.raises(RequestError, match="Too many fields. Maximum number of fields is 8"):
        read(*encoded(files=files[:1], data={str(i): "v" for i in range(9)}))
    with pytest.raises(RequestError, match=f"form field 'c' is over {MAX_FIELD_BYTES} bytes"):
        read(*encoded(files=files[:1], data={"c": "v" * (MAX_FIELD_BYTES + 1)}))
