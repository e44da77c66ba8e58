"""free_port: the ports test fixtures and `igw up --free-ports` start servers on."""

from __future__ import annotations

import socket

from igw.procs import _ephemeral_range, free_port


def test_ports_are_chosen_below_the_ephemeral_range_where_outgoing_connections_cannot_take_them() -> None:
    low, _ = _ephemeral_range()
    assert all(1024 <= free_port() < low for _ in range(50))


def test_one_process_never_hands_out_the_same_port_twice() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_a_port_handed_out_can_be_bound() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", free_port()))
