"""One HTTP(S) POST for everything the device sends upstream (readings, Avro files)."""

from __future__ import annotations

import ssl
import urllib.request


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float,
    authorization: str | None = None,
    context: ssl.SSLContext | None = None,
    what: str = "",
) -> None:
    """POST ``body``; OSError unless the answer is 2xx (``what`` prefixes the error)."""
    if authorization:
        headers = {**headers, "Authorization": authorization}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 - callers check http(s)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
        if not 200 <= response.status < 300:
            raise OSError(f"{what}HTTP {response.status}")
