"""Ports for the servers we start: free when chosen, and never what the kernel hands out next."""

import socket

import pytest

from deploy import ports


def kernel_choice() -> int:
    """What a bind to port 0 gets, as BentoML's `reserve_free_port` does for circus."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_chosen_port_is_free_and_below_the_ephemeral_range():
    port = ports.free_port()
    assert ports.LOWEST <= port < ports._first_ephemeral_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free: no error


def test_binds_to_port_zero_never_get_a_chosen_port():
    # The CI failure this guards against: `bentoml serve --port P` died with "Address already
    # in use" because circus's control endpoint, bound to port 0 first, was handed P.
    chosen = {ports.free_port() for _ in range(20)}
    handed_out = {kernel_choice() for _ in range(2000)}
    assert not chosen & handed_out


def test_no_port_is_handed_out_twice():
    chosen = [ports.free_port() for _ in range(200)]
    assert len(set(chosen)) == len(chosen)


def test_a_port_someone_listens_on_is_skipped(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        candidates = iter([busy, 23456, 23457, 23458])
        monkeypatch.setattr(ports.random, "randrange", lambda *_: next(candidates))
        monkeypatch.setattr(ports, "_handed_out", set())
        monkeypatch.setattr(ports, "_first_ephemeral_port", lambda: 65536)
        assert ports.free_port() != busy


def test_without_room_below_the_range_the_kernel_chooses(tmp_path, monkeypatch):
    (tmp_path / "range").write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "range")
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("range_text", ["", "garbage"])
def test_an_unreadable_range_is_taken_as_the_iana_dynamic_range(tmp_path, monkeypatch, range_text):
    (tmp_path / "range").write_text(range_text)
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "range")
    assert ports.LOWEST <= ports.free_port() < 49152
