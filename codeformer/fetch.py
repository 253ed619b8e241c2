"""Fetch request inputs given as http(s) URLs or data URIs, within fixed limits.

Every remote input of a request goes through ``fetch``, whoever calls ``predict()``:
- only ``http``/``https`` (and ``data:``), on every hop: a redirect to ``file://`` or any other
  scheme is refused, and at most ``MAX_REDIRECTS`` redirects are followed;
- a connect timeout, and one deadline for all of a request's fetches (a server that
  sends one byte a second is cut off when it passes, not when the client gives up);
- at most ``MAX_INPUT_BYTES`` per input, enforced while the body streams in, before a
  declared ``Content-Length`` is even read;
- failures raise ``InputError`` saying what happened, for the caller to prefix with the input.

Cog (coglet 0.23) would otherwise fetch ``Path`` inputs itself, before ``predict()`` runs,
with none of these limits and with errors that cannot name the input: ``defer_cog_fetching``
makes it hand URL and data URI strings through unfetched.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import socket
import time
import urllib.parse
from dataclasses import dataclass

import requests
import urllib3

from codeformer.errors import InputError

REMOTE_SCHEMES = ("http", "https")
# A 40-megapixel PNG (the default CODEFORMER_MAX_PIXELS) is about 120 MB, so honest inputs
# stay far below this.
MAX_INPUT_BYTES = 256 * 1024 * 1024
MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 10.0
CHUNK_BYTES = 1 << 16
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Deadline:
    """A point in ``time.monotonic()`` time shared by all fetches of one request."""

    at: float
    total_s: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def remaining_s(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise InputError(
                f"the download did not finish within {self.total_s:g} s (CODEFORMER_FETCH_TIMEOUT_S); "
                "send a smaller file or a faster URL"
            )
        return left


def is_remote(item: str) -> bool:
    """Whether a request string is a URL or data URI (as opposed to a local path)."""
    return item.startswith("data:") or urllib.parse.urlsplit(item).scheme.lower() in REMOTE_SCHEMES


def _too_large() -> InputError:
    return InputError(f"the file is over {MAX_INPUT_BYTES >> 20} MB; send a smaller image")


def decode_data_uri(uri: str) -> bytes:
    """The payload of a ``data:`` URI (base64 or percent-encoded); ``InputError`` when malformed."""
    header, comma, payload = uri.removeprefix("data:").partition(",")
    if not comma:
        raise InputError("the data URI has no ',' before its payload")
    if header.lower().endswith(";base64"):
        # 4 characters carry 3 bytes; refuse before decoding anything over the cap
        if len(payload) // 4 * 3 > MAX_INPUT_BYTES:
            raise _too_large()
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise InputError(f"the data URI's base64 payload is invalid ({exc})") from None
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > MAX_INPUT_BYTES:
        raise _too_large()
    return data


def _describe_status(response: requests.Response) -> str:
    return f"the server answered {response.status_code} {response.reason or ''}".rstrip()


def _read_body(response: requests.Response, deadline: Deadline) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_INPUT_BYTES:
        raise _too_large()
    raw: urllib3.HTTPResponse = response.raw
    sock = _socket_of(raw)
    body = bytearray()
    while True:
        # each read1 returns what one recv() gives, and that recv waits at most the time left
        left = deadline.remaining_s()
        if sock is not None:
            # closed once http.client has buffered the whole body: nothing left to wait for
            with contextlib.suppress(OSError):
                sock.settimeout(left)
        chunk = raw.read1(CHUNK_BYTES, decode_content=True)
        if not chunk:
            if raw.length_remaining:  # the connection closed before Content-Length bytes came
                raise InputError(f"the connection closed after {len(body)} of {declared} bytes; try again")
            return bytes(body)
        body += chunk
        if len(body) > MAX_INPUT_BYTES:
            raise _too_large()


def _socket_of(raw: urllib3.HTTPResponse) -> socket.socket | None:
    """The socket a streaming response reads from, to bound each recv by the deadline.

    urllib3 keeps it on the connection, but http.client hands it to the response (and the
    connection forgets it) when the server will close the connection after the body.
    """
    connection_sock = getattr(raw.connection, "sock", None)
    if connection_sock is not None:
        return connection_sock
    buffered = getattr(raw, "_fp", None)  # http.client.HTTPResponse
    socket_io = getattr(getattr(buffered, "fp", None), "raw", None)  # socket.SocketIO
    return getattr(socket_io, "_sock", None)


def _fetch_http(url: str, deadline: Deadline) -> bytes:
    with requests.Session() as session:
        for _ in range(MAX_REDIRECTS + 1):
            read_timeout = deadline.remaining_s()
            response = session.get(
                url,
                stream=True,
                allow_redirects=False,
                timeout=(min(CONNECT_TIMEOUT_S, read_timeout), read_timeout),
                headers={"Accept": "image/*", "Accept-Encoding": "identity"},
            )
            with response:
                if response.status_code in REDIRECT_STATUSES and "Location" in response.headers:
                    url = urllib.parse.urljoin(url, response.headers["Location"])
                    scheme = urllib.parse.urlsplit(url).scheme.lower()
                    if scheme not in REMOTE_SCHEMES:
                        raise InputError(
                            f"the URL redirects to {scheme}://; only http(s) redirects are followed"
                        )
                    continue
                if response.status_code >= 400:
                    raise InputError(_describe_status(response))
                return _read_body(response, deadline)
    raise InputError(f"the URL redirects more than {MAX_REDIRECTS} times")


def fetch(item: str, deadline: Deadline) -> bytes:
    """The bytes behind an http(s) URL or data URI; ``InputError`` saying what went wrong."""
    if item.startswith("data:"):
        return decode_data_uri(item)
    try:
        return _fetch_http(item, deadline)
    except requests.ConnectTimeout:
        raise InputError(f"could not connect within {CONNECT_TIMEOUT_S:g} s") from None
    except (requests.ReadTimeout, TimeoutError, urllib3.exceptions.ReadTimeoutError):
        deadline.remaining_s()  # raises when the request's deadline is what ran out
        raise InputError("the server stopped sending") from None
    except requests.ConnectionError as exc:
        raise InputError(f"could not connect: {_root_cause(exc)}") from None
    except (urllib3.exceptions.ProtocolError, ConnectionError) as exc:
        raise InputError(
            f"the connection broke before the whole file arrived ({_root_cause(exc)}); try again"
        ) from None
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise InputError(f"the download failed: {_root_cause(exc)}") from None


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's text: 'Connection refused', not three layers of wrappers."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text or type(exc).__name__


def defer_cog_fetching() -> None:
    """Make cog hand URL and data URI strings of ``Path`` inputs to ``predict()`` unfetched.

    coglet normalises each ``Path`` input in the worker with ``cog.types.Path.validate``;
    for a URL that returns a ``URLPath`` which coglet downloads before ``predict()`` runs
    (when every item of a list is one), with no deadline and no size cap, and its errors
    cannot name the input. Idempotent.
    """
    from cog import types as cog_types

    original = cog_types.Path.validate.__func__
    if getattr(original, "defers_fetching", False):
        return

    def validate(cls: type, value: object) -> object:
        if isinstance(value, str) and is_remote(value):
            return value
        return original(cls, value)

    validate.defers_fetching = True  # type: ignore[attr-defined]
    cog_types.Path.validate = classmethod(validate)  # type: ignore[method-assign,assignment]
