"""URL inputs reach public addresses only (codeformer.serving.fetch), on every hop, whatever the spelling.

Every test keeps its traffic on 127.0.0.1. Refusals of other addresses are shown with a
resolver and a connect function of the test's own: the refusal must come before the connect
function is ever called, so no packet leaves for those addresses. Where a fetch must go
through (a public address that is allowed), the test's connect function takes it to the
local file server instead.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from helpers import LOOPBACK_SPELLINGS
from weights_server import FileServer

from codeformer.config import Settings
from codeformer.errors import ConfigError, InputError
from codeformer.serving.fetch import Deadline, Dialer, address_kind, fetch, system_connect

PUBLIC = "93.184.215.14"  # a globally routable address; never connected to here
REFUSAL = "only public addresses are fetched (CODEFORMER_ALLOW_PRIVATE_URLS=1 allows them)"


class Recorder:
    """A resolver and a connect function under the test's control, recording every call."""

    def __init__(self, answers: dict[str, Sequence[str]], route: dict[str, tuple[str, int]] | None = None):
        self.answers = answers  # host -> the addresses it resolves to (a list per call, last repeats)
        self.route = route or {}  # vetted address -> where the test really connects (loopback)
        self.lookups: list[str] = []
        self.connects: list[tuple[str, int]] = []

    def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.answers:
            return [str(ipaddress.ip_address(host))]  # an address literal stands for itself
        return list(self.answers[host])

    def connect(self, address: tuple[str, int], timeout: float | None) -> socket.socket:
        self.connects.append(address)
        if address[0] not in self.route:
            raise AssertionError(f"the fetch tried to connect to {address}")
        return system_connect(self.route[address[0]], timeout)

    def dialer(self, allow_private: bool = False) -> Dialer:
        return Dialer(allow_private, self.resolve, self.connect)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[FileServer]:
    (tmp_path / "photo.jpg").write_bytes(b"photo bytes")
    with FileServer(tmp_path) as server:
        yield server


def local_url(server: FileServer, host: str, path: str = "photo.jpg") -> str:
    return f"http://{host}:{server.port}/{path}"


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_this_machine_is_refused_before_any_request(files: FileServer, host: str) -> None:
    with pytest.raises(InputError) as refused:
        fetch(local_url(files, host), Deadline.after(10))
    kind = "unspecified" if host == "0.0.0.0" else "loopback"
    assert f"{host.strip('[]')}" in str(refused.value) and f"{kind} address; {REFUSAL}" in str(refused.value)
    assert files.request_count("photo.jpg") == 0


@pytest.mark.parametrize("host", [h for h in LOOPBACK_SPELLINGS if h != "[::1]"])  # the server is IPv4
def test_every_spelling_is_fetched_when_private_urls_are_allowed(files: FileServer, host: str) -> None:
    assert fetch(local_url(files, host), Deadline.after(10), Dialer(allow_private=True)) == b"photo bytes"
    assert files.request_count("photo.jpg") == 1


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("169.254.169.254", "link-local"),  # cloud metadata endpoints
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "unique-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.1", "documentation"),
        ("2001:db8::1", "documentation"),
        ("240.0.0.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("192.0.0.8", "reserved"),
        ("::ffff:10.0.0.1", "private"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
        ("::7f00:1", "loopback"),  # IPv4-compatible 127.0.0.1
    ],
)
def test_addresses_that_are_not_public_are_refused_without_connecting(address: str, kind: str) -> None:
    recorder = Recorder({"photos.example": [address]})
    with pytest.raises(InputError, match=f"is an? {kind} address; "):
        fetch("http://photos.example/photo.jpg", Deadline.after(10), recorder.dialer())
    assert recorder.connects == []
    assert address_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_are_public(address: str) -> None:
    assert address_kind(ipaddress.ip_address(address)) is None


def test_a_name_with_any_address_that_is_not_public_is_refused(files: FileServer) -> None:
    recorder = Recorder({"photos.example": [PUBLIC, "127.0.0.1"]}, {PUBLIC: ("127.0.0.1", files.port)})
    with pytest.raises(InputError, match=r"photos\.example \(127\.0\.0\.1\) is a loopback address"):
        fetch(local_url(files, "photos.example"), Deadline.after(10), recorder.dialer())
    assert recorder.connects == [] and files.request_count("photo.jpg") == 0


def test_the_connection_goes_to_the_address_that_was_vetted(files: FileServer) -> None:
    """DNS rebinding: the name resolves public when vetted and to 127.0.0.1 on every later lookup."""
    answers = iter([[PUBLIC]])
    recorder = Recorder({}, {PUBLIC: ("127.0.0.1", files.port)})
    recorder.resolve = lambda host, port: recorder.lookups.append(host) or next(answers, ["127.0.0.1"])
    data = fetch(local_url(files, "photos.example"), Deadline.after(10), recorder.dialer())
    assert data == b"photo bytes"
    assert recorder.lookups == ["photos.example"]  # one lookup per connection
    assert recorder.connects == [(PUBLIC, files.port)]  # to the vetted address, never to a second answer


@pytest.mark.parametrize(
    "location",
    ["http://127.0.0.1:{port}/photo.jpg", "http://169.254.169.254/latest/meta-data/", "http://[::1]/"],
)
def test_a_redirect_to_a_refused_address_is_refused_before_connecting(
    files: FileServer, location: str
) -> None:
    files.redirect("hop.jpg", location.format(port=files.port))
    recorder = Recorder({"photos.example": [PUBLIC]}, {PUBLIC: ("127.0.0.1", files.port)})
    with pytest.raises(InputError, match="address; only public addresses are fetched"):
        fetch(local_url(files, "photos.example", "hop.jpg"), Deadline.after(10), recorder.dialer())
    assert recorder.connects == [(PUBLIC, files.port)]  # the first hop only
    assert files.request_count("hop.jpg") == 1 and files.request_count("photo.jpg") == 0


def test_name_resolution_counts_against_the_requests_deadline() -> None:
    release = threading.Event()

    def stuck(host: str, port: int) -> list[str]:
        release.wait(30)  # a resolver that does not answer
        return [PUBLIC]

    try:
        with pytest.raises(InputError, match="did not finish within 0.3 s"):
            fetch("http://photos.example/photo.jpg", Deadline.after(0.3), Dialer(False, stuck))
    finally:
        release.set()


def test_the_setting_allows_private_urls_and_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODEFORMER_ALLOW_PRIVATE_URLS")
    assert Settings.from_env().allow_private_urls is False
    monkeypatch.setenv("CODEFORMER_ALLOW_PRIVATE_URLS", "1")
    assert Settings.from_env().allow_private_urls is True
    monkeypatch.setenv("CODEFORMER_ALLOW_PRIVATE_URLS", "yes")
    with pytest.raises(ConfigError, match="CODEFORMER_ALLOW_PRIVATE_URLS must be 0 or 1, got 'yes'"):
        Settings.from_env()
