"""
ListeningService: binds in privilegedStartService (before twistd drops privileges), or
in startService when started without it; a failure to bind is fatal at once; stopping
closes the port or cancels a listen still pending.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from kthena import listening
from kthena.listening import CannotListenError, ListeningService


class RefusingReactor(MemoryReactor):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise error.CannotListenError(interface, port, OSError(98, "Address already in use"))


def test_binds_in_the_privileged_step() -> None:
    reactor = MemoryReactor()
    service = ListeningService(reactor, "tcp:80:interface=127.0.0.1", Factory())
    service.privilegedStartService()
    assert [(p, i) for p, _, _, i in reactor.tcpServers] == [(80, "127.0.0.1")]
    service.startService()  # does not bind twice
    assert len(reactor.tcpServers) == 1
    assert service.port is not None


def test_binds_on_start_without_the_privileged_step() -> None:
    reactor = MemoryReactor()
    service = ListeningService(reactor, "tcp:8080", Factory())
    service.startService()
    assert len(reactor.tcpServers) == 1


def test_a_port_that_cannot_be_bound_is_fatal_at_once() -> None:
    service = ListeningService(RefusingReactor(), "tcp:8080", Factory())
    with pytest.raises(CannotListenError) as caught:
        service.privilegedStartService()
    assert str(caught.value) == "kthena: cannot listen on tcp:8080: Address already in use"
    assert isinstance(caught.value, SystemExit)  # twistd and twist exit with status 1


def test_a_systemd_socket_that_was_not_passed_is_fatal_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    service = ListeningService(MemoryReactor(), "systemd:domain=INET:index=0", Factory())
    with pytest.raises(CannotListenError) as caught:
        service.privilegedStartService()
    assert str(caught.value) == (
        "kthena: cannot listen on systemd:domain=INET:index=0: no such socket passed by "
        "systemd (LISTEN_FDS, LISTEN_FDNAMES)"
    )


class RecordingPort:
    stopped = 0

    def stopListening(self) -> Deferred[None]:
        self.stopped += 1
        return succeed(None)

    def getHost(self) -> Any:
        return None


class RecordingReactor(MemoryReactor):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        self.port = RecordingPort()
        return self.port


def test_stop_closes_the_port() -> None:
    reactor = RecordingReactor()
    service = ListeningService(reactor, "tcp:8080", Factory())
    service.privilegedStartService()
    service.startService()
    stopped = service.stopService()
    assert stopped is not None and stopped.called
    assert (service.port, reactor.port.stopped) == (None, 1)


def test_stop_cancels_a_listen_still_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    pending: Deferred[Any] = Deferred()

    class SlowEndpoint:
        def listen(self, factory: Any) -> Deferred[Any]:
            return pending

    monkeypatch.setattr(listening, "serverFromString", lambda reactor, text: SlowEndpoint())
    reactor = MemoryReactor()
    service = ListeningService(reactor, "slow:1", Factory())
    service.startService()
    assert service.stopService() is None
    assert pending.called  # cancelled, quietly (no reactor stop)
    assert reactor.running is False
