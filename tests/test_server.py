"""``server.launch`` tries again on a new port when another process took the one it picked."""

from __future__ import annotations

import pytest

from tokendance_sgl import server


def _fake_launches(monkeypatch, errors: list[str]) -> list[int]:
    ports: list[int] = []

    def launch_once(model_path, kv_backend, port, *rest):
        ports.append(port)
        if len(ports) <= len(errors):
            raise server.ServerStartError(errors[len(ports) - 1])
        return f"server on {port}"

    monkeypatch.setattr(server, "_launch_once", launch_once)
    return ports


def test_a_port_taken_before_the_server_binds_it_is_replaced(monkeypatch):
    ports = _fake_launches(monkeypatch, ["ERROR: [Errno 98] Address already in use"])
    assert server.launch("model") == f"server on {ports[-1]}"
    assert len(ports) == 2


def test_other_start_errors_and_a_given_port_are_not_retried(monkeypatch):
    ports = _fake_launches(monkeypatch, ["the SGLang server exited with code 1: out of memory"])
    with pytest.raises(server.ServerStartError, match="out of memory"):
        server.launch("model")
    assert len(ports) == 1
    ports = _fake_launches(monkeypatch, ["[Errno 98] address already in use"])
    with pytest.raises(server.ServerStartError):
        server.launch("model", port=12345)
    assert ports == [12345]


def test_it_gives_up_after_three_tries(monkeypatch):
    ports = _fake_launches(monkeypatch, ["[Errno 98] address already in use"] * 5)
    with pytest.raises(server.ServerStartError):
        server.launch("model")
    assert len(ports) == 3
