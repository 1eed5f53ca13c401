"""The SIP fuzzer's CI slice (tools/sip_fuzz.py, issue 11 item 5): a few thousand seeded, grammar-aware malformed
requests over UDP and TCP against an in-process SIPUserAgentServer with short timers, then the oracle: alive, no
traceback, RSS/fds back within bounds, calls back to 0, every addressable request answered, and a normal call
(G.711 RTP of a held-out WAV) transcribed by the demo model.

Runs in a private loopback-only network namespace where the kernel allows it (fuzzed ``c=``/Route addresses then
cannot reach anything); elsewhere the fuzzer forces those addresses to 127.0.0.1. The on-demand run
(``python -m tools.sip_fuzz --inputs 200000``) is described in transports/sip/README.md.
"""

import pytest

from tools.sip_fuzz import enter_loopback_namespace, parse_args, run

SLICE_INPUTS = 3000


@pytest.fixture(scope="module")
def namespace():
    leave = enter_loopback_namespace()
    yield leave is not None
    if leave is not None:
        leave()


@pytest.mark.xfail(reason="issue 11: the hardening of transports/sip (total parser/SDP/set-up) is not committed yet; "
                   "committed HEAD gives tracebacks and stuck calls on this slice", strict=False)
@pytest.mark.timeout(180)
async def test_fuzz_slice_leaves_the_server_up_clean_and_transcribing(namespace):
    args = parse_args(["--inputs", str(SLICE_INPUTS), "--seed", "1", "--in-process", "--findings", "",
                       "--repro", "0", "--quiet", "--settle", "20", "--probe-every", "1000"])
    args._namespace = namespace
    report = await run(args)
    assert report.inputs == SLICE_INPUTS
    assert not report.failures(), report.summary()
