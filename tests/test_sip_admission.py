"""Admission (issue 11 item 4, SIP side): a reservation before the answer, 503 + Retry-After when full, OPTIONS
503 while full, and the reservation released exactly once however the call ends (after its application)."""

import asyncio

import pytest

from pipecat_nemotron.transports.sip import CallAdmission, Reservation
from sip_support import calls_recorder, serving, until
from test_sip_uas import Dialog, offer, peer, rtp_peer  # noqa: F401 (fixtures)


class FakeReservation:
    def __init__(self, admission):
        self.admission = admission
        self.releases = 0

    def release(self):
        self.releases += 1
        if self.releases == 1:
            self.admission.held -= 1


class FakeAdmission:
    """What the engine offers (``try_reserve()``, ``has_capacity``), with ``size`` slots."""

    def __init__(self, size):
        self.size, self.held, self.given = size, 0, []

    def try_reserve(self):
        if self.held >= self.size:
            return None
        self.held += 1
        self.given.append(FakeReservation(self))
        return self.given[-1]

    @property
    def has_capacity(self):
        return self.held < self.size


def test_fakes_satisfy_the_protocols():
    admission = FakeAdmission(1)
    assert isinstance(admission, CallAdmission) and isinstance(admission.try_reserve(), Reservation)


async def test_full_admission_503_with_retry_after_and_options_503(peer, rtp_peer):
    admission = FakeAdmission(1)
    finished = asyncio.Event()

    async def on_call(call):
        await call.ended.wait()
        await asyncio.sleep(0.2)  # the STT still drains the last words on the reservation
        finished.set()

    async with serving(on_call, admission=admission, retry_after_secs=7) as server:
        first = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        await first.connect()
        call = next(iter(server.calls.values()))
        assert call.reservation is admission.given[0] and not admission.has_capacity
        second = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        second.invite()
        busy = await peer.expect(status=503)
        assert busy.call_id == second.call_id and busy.get("Retry-After") == "7"
        Dialog(peer, server.port).send("OPTIONS")  # a proxy's health check: stop routing here
        full = await peer.expect(status=503)
        assert full.get("Retry-After") == "7" and full.reason == "Service Unavailable (full)"
        first.send("BYE")
        await peer.expect(status=200)
        await asyncio.sleep(0.05)
        assert admission.given[0].releases == 0 and server.active_calls == 1  # application still finishing
        await asyncio.wait_for(finished.wait(), 2)
        await until(lambda: admission.given[0].releases == 1)
        assert server.active_calls == 0
        options = Dialog(peer, server.port)
        options.send("OPTIONS")
        while (await peer.expect(status=200)).call_id != options.call_id:
            pass
        third = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        assert (await third.connect()).status == 200
    assert [r.releases for r in admission.given] == [1, 1]  # the third released by the server's stop


async def test_call_limit_503_and_options_503_carry_retry_after(peer, rtp_peer):
    calls, on_call = calls_recorder()
    async with serving(on_call, max_calls=1) as server:
        await Dialog(peer, server.port, rtp_port=rtp_peer.port).connect()
        Dialog(peer, server.port, rtp_port=rtp_peer.port).invite()
        assert (await peer.expect(status=503)).get("Retry-After") == "5"
        Dialog(peer, server.port).send("OPTIONS")
        limit = await peer.expect(status=503)
        assert limit.get("Retry-After") == "5" and limit.reason == "Service Unavailable (call limit reached)"


async def test_options_503_says_why_draining_or_lagging(peer):
    """OPTIONS' 503 names the admission's ``unavailable`` (the servers' DrainingAdmission): an operator reading a
    dispatcher's probe log sees a draining node apart from a full or lagging one."""
    from pipecat_nemotron.apps.drain import Drain, DrainingAdmission

    class LaggingEngine(FakeAdmission):
        lagging = False

        @property
        def has_capacity(self):
            return not self.lagging and super().has_capacity

    engine, drain = LaggingEngine(2), Drain(timeout_s=1)
    calls, on_call = calls_recorder()
    async with serving(on_call, admission=DrainingAdmission(drain=drain, engine=engine)) as server:
        reasons = []
        for state in ["ok", "lag", "draining"]:
            engine.lagging = state != "ok"
            if state == "draining":
                engine.lagging = False
                drain.request("test")
            probe = Dialog(peer, server.port)
            probe.send("OPTIONS")
            while (answer := await peer.expect(status=200 if state == "ok" else 503)).call_id != probe.call_id:
                pass
            reasons.append((answer.status, answer.reason))
    assert reasons == [(200, "OK"), (503, "Service Unavailable (lag)"), (503, "Service Unavailable (draining)")]


@pytest.mark.parametrize("ending", ["rejected 488", "cancelled", "no ACK", "server stop", "application"])
async def test_reservation_released_exactly_once_however_the_call_ends(peer, rtp_peer, ending):
    admission = FakeAdmission(4)
    config = {"ring_secs": 5} if ending == "cancelled" else {}
    if ending == "no ACK":
        config = {"t1": 0.01, "t2": 0.02}

    async def on_call(call):
        if ending == "application":
            return  # the application returns at once: the server hangs up
        await call.ended.wait()

    async with serving(on_call, admission=admission, **config) as server:
        dialog = Dialog(peer, server.port, rtp_port=rtp_peer.port)
        if ending == "rejected 488":
            peer.send(dialog.request("INVITE", body=offer(4000).replace("RTP/AVP 0 8 101", "RTP/AVP 96")),
                      server.port)
            await peer.expect(status=488)
        elif ending == "cancelled":
            dialog.invite()
            await peer.expect(status=180)
            peer.send(dialog.request("CANCEL", branch=dialog.invite_branch), server.port)
            await peer.expect(status=487)
        elif ending == "no ACK":
            dialog.invite()
            await peer.expect(method="BYE", timeout=3)
        else:
            await dialog.connect()
        if ending != "server stop":
            await until(lambda: admission.given and admission.given[0].releases == 1)
    assert len(admission.given) == 1 and admission.given[0].releases == 1 and admission.held == 0
