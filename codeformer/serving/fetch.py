"""Fetch request inputs given as http(s) URLs or data URIs, within fixed limits.

Every remote input of a request goes through ``fetch``, whoever calls ``run()``:
- only ``http``/``https`` (and ``data:``), on every hop: a redirect to ``file://`` or any other
  scheme is refused, and at most ``MAX_REDIRECTS`` redirects are followed;
- only public addresses, on every hop: each connection resolves its host once (within the
  request's deadline), refuses the host when any of its addresses is not globally routable
  (loopback, private, link-local, ...: ``address_kind``), and connects to a vetted address,
  so a name cannot resolve to a public address when checked and to 127.0.0.1 when connected
  (DNS rebinding). The request keeps the host name for Host, TLS SNI and the certificate
  check. ``Dialer(allow_private=True)`` (``CODEFORMER_ALLOW_PRIVATE_URLS=1``) lifts the rule;
- a connect timeout, and one deadline for all of a request's fetches, name resolution
  included (a server that sends one byte a second is cut off when it passes, not when the
  client gives up);
- at most ``MAX_INPUT_BYTES`` per input, enforced while the body streams in, before a
  declared ``Content-Length`` is even read;
- failures raise ``InputError`` saying what happened, for the caller to prefix with the input.

Cog (coglet 0.23) would otherwise fetch ``Path`` inputs itself, before ``run()`` runs,
with none of these limits and with errors that cannot name the input: ``defer_cog_fetching``
makes it hand URL and data URI strings through unfetched.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import ipaddress
import socket
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
import urllib3.connection
import urllib3.connectionpool
import urllib3.util.connection

from codeformer.errors import ConfigError, InputError

REMOTE_SCHEMES = ("http", "https")
# A 40-megapixel PNG (the default CODEFORMER_MAX_PIXELS) is about 120 MB, so honest inputs
# stay far below this.
MAX_INPUT_BYTES = 256 * 1024 * 1024
MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 10.0
CHUNK_BYTES = 1 << 16
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# name lookups run here so that the request's deadline bounds them (getaddrinfo has no
# timeout of its own); a lookup that outlives its deadline finishes in the background
RESOLVER_THREADS = 8
_resolver_pool = concurrent.futures.ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="resolve")


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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# ranges ipaddress has no predicate for, with how a refusal names them
CARRIER_GRADE_NAT = ipaddress.ip_network("100.64.0.0/10")
DOCUMENTATION = tuple(
    ipaddress.ip_network(block)
    for block in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "3fff::/20")
)
PRIVATE = tuple(
    ipaddress.ip_network(block) for block in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fec0::/10")
)  # RFC 1918, and IPv6's deprecated site-local block
UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
# not globally reachable as a block (RFC 6890), though ipaddress calls most of it global
IETF_PROTOCOL_ASSIGNMENTS = ipaddress.ip_network("192.0.0.0/24")
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, 6to4, NAT64), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    packed = address.packed
    if address in NAT64 or (packed[:12] == bytes(12) and int(address) > 1):  # ::a.b.c.d
        return ipaddress.IPv4Address(packed[12:])
    return None


def address_kind(address: IPAddress) -> str | None:
    """Why ``address`` is not fetched from (``loopback``, ``private``, ...), or None when public."""
    inner = embedded_ipv4(address)
    if inner is not None:
        return address_kind(inner)
    checks = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address in CARRIER_GRADE_NAT, "carrier-grade NAT"),
        (address == ipaddress.IPv4Address("255.255.255.255"), "broadcast"),
        (any(address in block for block in DOCUMENTATION), "documentation"),
        (address in UNIQUE_LOCAL, "unique-local"),
        (any(address in block for block in PRIVATE), "private"),
        (not address.is_global or address in IETF_PROTOCOL_ASSIGNMENTS, "reserved"),
    )
    return next((kind for matched, kind in checks if matched), None)


Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> its addresses, as text
Connector = Callable[[tuple[str, int], "float | None"], socket.socket]  # (address, port), timeout


def system_resolve(host: str, port: int) -> list[str]:
    """The addresses ``getaddrinfo`` gives for ``host`` (what a connection would try), in order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def system_connect(address: tuple[str, int], timeout: float | None) -> socket.socket:
    """A TCP connection to a numeric ``address`` (no name lookup), with urllib3's socket options."""
    return urllib3.util.connection.create_connection(
        address, timeout, socket_options=urllib3.connection.HTTPConnection.default_socket_options
    )


@dataclass(frozen=True)
class Dialer:
    """How fetches reach a host: which addresses are allowed, how names resolve, how to connect.

    Tests pass their own ``resolve`` and ``connect`` to show a refusal before any packet is sent.
    """

    allow_private: bool = False
    resolve: Resolver = system_resolve
    connect: Connector = system_connect

    def open(self, host: str, port: int, timeout: float | None, deadline: Deadline) -> socket.socket:
        """A socket connected to a vetted address of ``host``; ``InputError`` when refused."""
        lookup = _resolver_pool.submit(self.resolve, host, port)
        try:
            addresses = lookup.result(timeout=deadline.remaining_s())
        except concurrent.futures.TimeoutError:
            deadline.remaining_s()  # raises: the deadline is what ran out
            raise
        vetted = [ipaddress.ip_address(address.split("%", 1)[0]) for address in addresses]
        if not vetted:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
        if not self.allow_private:
            for address in vetted:
                kind = address_kind(address)
                if kind is not None:
                    article = "an" if kind[0] in "aeiou" else "a"
                    raise InputError(
                        f"{_shown(host, address)} is {article} {kind} address; only public addresses "
                        "are fetched (CODEFORMER_ALLOW_PRIVATE_URLS=1 allows them)"
                    )
        error: OSError | None = None
        for address in vetted:
            try:
                return self.connect((str(address), port), timeout)
            except OSError as exc:  # the next address, as create_connection does
                error = exc
        assert error is not None
        raise error


def _shown(host: str, address: IPAddress) -> str:
    """``host`` as the URL wrote it, with the address it stands for when that reads differently."""
    try:
        same = ipaddress.ip_address(host.strip("[]")) == address
    except ValueError:
        same = False
    return host if same else f"{host} ({address})"


class _VettedConnectionMixin:
    """urllib3 connections that dial through a ``Dialer`` instead of resolving the host themselves."""

    host: str
    port: int
    timeout: float | None

    def __init__(self, *args: Any, dialer: Dialer, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dialer = dialer
        self.deadline = deadline

    def _new_conn(self) -> socket.socket:
        try:
            return self.dialer.open(self.host, self.port, self.timeout, self.deadline)
        except TimeoutError as exc:
            raise urllib3.exceptions.ConnectTimeoutError(
                self, f"connecting to {self.host} timed out"
            ) from exc
        except OSError as exc:
            raise urllib3.exceptions.NewConnectionError(
                self, f"Failed to establish a new connection: {exc}"
            ) from exc


class _VettedHTTPConnection(_VettedConnectionMixin, urllib3.connection.HTTPConnection):
    pass


class _VettedHTTPSConnection(_VettedConnectionMixin, urllib3.connection.HTTPSConnection):
    pass


class _VettedPoolManager(urllib3.PoolManager):
    """Pools whose connections dial through ``dialer`` within ``deadline``."""

    def __init__(self, dialer: Dialer, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dialer = dialer
        self.deadline = deadline

    def _new_pool(
        self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None
    ) -> urllib3.connectionpool.HTTPConnectionPool:
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.ConnectionCls = _VettedHTTPSConnection if scheme == "https" else _VettedHTTPConnection
        pool.conn_kw = {**pool.conn_kw, "dialer": self.dialer, "deadline": self.deadline}
        return pool


class _VettedAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, dialer: Dialer, deadline: Deadline) -> None:
        self.dialer = dialer
        self.deadline = deadline
        super().__init__(max_retries=0)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        self.poolmanager = _VettedPoolManager(
            self.dialer, self.deadline, num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs
        )


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


def _fetch_http(url: str, deadline: Deadline, dialer: Dialer) -> bytes:
    with requests.Session() as session:
        # no proxies or .netrc from the environment: the dialer decides where a fetch connects
        session.trust_env = False
        adapter = _VettedAdapter(dialer, deadline)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
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


def fetch(item: str, deadline: Deadline, dialer: Dialer | None = None) -> bytes:
    """The bytes behind an http(s) URL or data URI; ``InputError`` saying what went wrong.

    ``dialer`` decides which addresses a URL may reach (default: public ones only).
    """
    if item.startswith("data:"):
        return decode_data_uri(item)
    try:
        return _fetch_http(item, deadline, dialer or Dialer())
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
    """Make cog hand URL and data URI strings of ``Path`` inputs to ``run()`` unfetched.

    coglet normalises each ``Path`` input in the worker with ``cog.types.Path.validate``;
    for a URL that returns a ``URLPath`` which coglet downloads before ``run()`` runs
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
    validate.__wrapped__ = original  # type: ignore[attr-defined]
    cog_types.Path.validate = classmethod(validate)  # type: ignore[method-assign,assignment]


# What check_fetching_deferred sends through cog's normalisation. Nothing should fetch them;
# were a cog to, the URL stays on this machine.
_PROBE_INPUTS = ("https://127.0.0.1/probe.jpg", "data:image/jpeg;base64,/9j/")


def check_fetching_deferred() -> None:
    """Raise ``ConfigError`` unless the running cog hands URL inputs to ``run()`` unfetched.

    Sends an https URL and a data URI through ``cog.types.Path.validate``, the function coglet
    normalises each ``Path`` input with in its worker: each must come back as the same string.
    A cog or coglet that normalises another way would download user URLs itself, with none of
    this module's limits (deadline, size cap, public addresses only), so set-up stops instead.
    """
    from importlib.metadata import version

    from cog import types as cog_types

    for probe in _PROBE_INPUTS:
        normalised = cog_types.Path.validate(probe)
        if not (isinstance(normalised, str) and normalised == probe):
            raise ConfigError(
                f"cog {version('cog')} / coglet {version('coglet')} turned the URL input "
                f"{probe[:30]!r} into {type(normalised).__name__}: it would download user URLs itself, "
                "without this model's limits. Build with the cog and coglet that requirements.txt "
                "pins (cog.yaml build.sdk_version, COGLET_WHEEL=pypi:<version> cog build)"
            )
