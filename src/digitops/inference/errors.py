"""The service's one error type: what went wrong, in words a client can act on, and the HTTP
status to answer with. The request path raises these; the service maps them to JSON replies."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the service cannot serve as sent; `.status` is the HTTP status (4xx/503)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ImageError(RequestError):
    """The image itself is unusable: not an image, too big (413), a type we don't read (415)."""


class EmptyImageError(ImageError):
    """No ink found: the image is blank or nothing in it stands out from the background."""

    def __init__(self, message: str | None = None):
        super().__init__(
            message
            or "No digit found: the image is blank or nothing stands out from its background. "
            "Send a drawing or photo of one digit with clear contrast.",
            status=422,
        )
