"""Safe defaults: serve-sip answers only loopback and private networks unless --allow says otherwise; serve-webrtc
listens on a non-loopback address only when asked to on purpose."""

import asyncio
import io

import pytest

from pipecat_nemotron.transports.sip.config import PRIVATE_NETWORKS, SIPConfig, allowed_peers_for


@pytest.mark.parametrize("address, allowed", [
    ("127.0.0.1", True), ("::1", True), ("10.1.2.3", True), ("172.16.0.9", True), ("172.31.255.1", True),
    ("192.168.1.20", True), ("fd00::5", True), ("fe80::1", True), ("169.254.3.4", True), ("::ffff:10.0.0.1", True),
    ("8.8.8.8", False), ("172.32.0.1", False), ("100.64.0.1", False), ("2001:db8::1", False),
    ("::ffff:8.8.8.8", False), ("not-an-ip", False),
])
def test_without_allow_only_loopback_and_private_networks_may_call(address, allowed):
    assert SIPConfig(allowed_peers=allowed_peers_for([])).allows(address) is allowed


def test_allow_lists_and_any():
    assert allowed_peers_for([]) == PRIVATE_NETWORKS
    assert allowed_peers_for(["any"]) == ()  # SIPConfig: empty = everyone
    assert SIPConfig(allowed_peers=allowed_peers_for(["any"])).allows("8.8.8.8")
    config = SIPConfig(allowed_peers=allowed_peers_for(["203.0.113.0/24"]))
    assert config.allows("203.0.113.9") and not config.allows("10.0.0.1") and not config.allows("127.0.0.1")
    with pytest.raises(ValueError, match="not an IP address or network"):
        allowed_peers_for(["example.com"])


async def test_serve_sip_gives_the_sip_server_the_private_allow_list(monkeypatch):
    from pipecat_nemotron.apps import phone

    configs = []

    class FakeServer:
        def __init__(self, *, on_call, config):
            configs.append(config)
            raise asyncio.CancelledError  # stop before binding anything

    monkeypatch.setattr(phone, "SIPServer", FakeServer)
    for allow, expected in (([], PRIVATE_NETWORKS), (["any"], ()), (["10.0.0.0/8"], ("10.0.0.0/8",))):
        args = phone.parse_args(["--model", "demo", "--max-calls", "2"] + [x for a in allow for x in ("--allow", a)])
        with pytest.raises(asyncio.CancelledError):
            await phone.serve(args, stt_factory=lambda call: None, out=io.StringIO())
        assert configs[-1].allowed_peers == expected


async def test_serve_webrtc_refuses_a_public_address_before_loading(monkeypatch):
    from pipecat_nemotron.apps import webrtc_server

    def explode(**kwargs):
        raise AssertionError("the server was built (model load) before the host was checked")

    monkeypatch.setattr(webrtc_server, "WebRTCServer", explode)
    with pytest.raises(ValueError, match="allow_remote"):
        await webrtc_server.serve_webrtc(host="0.0.0.0", model="demo")
    with pytest.raises(AssertionError, match="model load"):  # loopback and allow_remote=True go on to the server
        await webrtc_server.serve_webrtc(host="192.0.2.1", model="demo", allow_remote=True)


def test_max_calls_defaults_are_the_measured_capacities():
    """serve-sip's --max-calls (and serve-riva's --max-streams) default to what benchmarks/sip_capacity.py measured
    on a 2-core CPU: 24 for the demo model, 3 for the 0.6B model in int8, 1 in fp32 (it cannot keep up with one)."""
    from pipecat_nemotron.apps.phone import default_max_calls

    model = "nvidia/nemotron-3.5-asr-streaming-0.6b"
    assert default_max_calls("demo", "cpu")[0] == 24
    assert default_max_calls(model, "cpu", "int8") == (3, default_max_calls(model, "cpu", "int8")[1])
    assert "int8" in default_max_calls(model, "cpu", "int8")[1]
    assert default_max_calls(model, "cpu")[0] == 1 and "--precision int8" in default_max_calls(model, "cpu")[1]
