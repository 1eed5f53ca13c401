"""Digest authentication (`transports/sip/digest.py`): the RFC 7616 §3.9.1 and RFC 2617 §3.5 example vectors, the
choice of algorithm, nonce reuse with nc counting up, stale nonces, refused credentials and hostile challenges."""

import re

import pytest

from pipecat_nemotron.transports.sip.digest import (Credentials, DigestClient, SIPAuthError, digest_response,
                                                    parse_challenge)
from pipecat_nemotron.transports.sip.message import SIPResponse

RFC7616 = dict(username="Mufasa", password="Circle of Life", realm="http-auth@example.org",
               nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", method="GET", uri="/dir/index.html",
               qop="auth", nc="00000001", cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")


def test_rfc7616_example_md5():
    assert digest_response(algorithm="MD5", **RFC7616) == "8ca523f5e9506fed4657c9700eebdbec"


def test_rfc7616_example_sha256():
    assert digest_response(algorithm="SHA-256", **RFC7616) == \
        "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"


def test_rfc2617_example():
    assert digest_response(algorithm="MD5", username="Mufasa", password="Circle Of Life",
                           realm="testrealm@host.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", method="GET",
                           uri="/dir/index.html", qop="auth", nc="00000001",
                           cnonce="0a4f113b") == "6629fae49393a05397450978507c4ef1"


def challenge_response(status: int, *values: str) -> SIPResponse:
    response = SIPResponse(status=status, reason="Unauthorized" if status == 401 else "Proxy Authentication Required")
    for value in values:
        response.add("WWW-Authenticate" if status == 401 else "Proxy-Authenticate", value)
    return response


def params(header_value: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^,\s]+)', header_value)}


def verify(header_value: str, password: str, method: str = "REGISTER") -> bool:
    p = params(header_value)
    expected = digest_response(algorithm=p["algorithm"], username=p["username"], password=password, realm=p["realm"],
                               nonce=p["nonce"], method=method, uri=p["uri"], qop=p.get("qop"), nc=p.get("nc", ""),
                               cnonce=p.get("cnonce", ""))
    return expected == p["response"]


def test_sha256_is_chosen_and_the_nonce_reused_with_nc_counting_up():
    client = DigestClient(Credentials("bot", "s3cret"))
    client.challenged(challenge_response(401, 'Digest realm="pbx", nonce="n1", qop="auth", algorithm=MD5',
                                         'Digest realm="pbx", nonce="n1", qop="auth,auth-int", algorithm=SHA-256, '
                                         'opaque="op"'))
    [(name, first)] = client.headers("REGISTER", "sip:pbx.example")
    assert name == "Authorization" and verify(first, "s3cret")
    p = params(first)
    assert (p["algorithm"], p["qop"], p["nc"], p["opaque"], p["uri"]) == ("SHA-256", "auth", "00000001", "op",
                                                                         "sip:pbx.example")
    client.accepted()
    [(_, second)] = client.headers("REGISTER", "sip:pbx.example")
    assert params(second)["nc"] == "00000002" and params(second)["cnonce"] != p["cnonce"] and verify(second, "s3cret")


def test_a_second_challenge_after_fresh_credentials_is_a_wrong_password():
    client = DigestClient(Credentials("bot", "wrong"))
    client.challenged(challenge_response(401, 'Digest realm="pbx", nonce="n1", qop="auth"'))
    client.headers("REGISTER", "sip:pbx")
    with pytest.raises(SIPAuthError, match="refused.*wrong user name or password"):
        client.challenged(challenge_response(401, 'Digest realm="pbx", nonce="n2", qop="auth"'))


def test_stale_nonce_and_a_refused_reused_nonce_are_answered_again():
    client = DigestClient(Credentials("bot", "s3cret"))
    client.challenged(challenge_response(407, 'Digest realm="proxy", nonce="n1"'))  # RFC 2069 form: no qop
    [(name, value)] = client.headers("INVITE", "sip:callee@proxy")
    assert name == "Proxy-Authorization" and "nc=" not in value and verify(value, "s3cret", "INVITE")
    client.challenged(challenge_response(407, 'Digest realm="proxy", nonce="n2", stale=true'))  # not an error
    client.accepted()
    client.headers("INVITE", "sip:callee@proxy")
    [(_, reused)] = client.headers("INVITE", "sip:callee@proxy")  # n2 used twice
    client.challenged(challenge_response(407, 'Digest realm="proxy", nonce="n3"'))  # one-time nonces: fine
    [(_, fresh)] = client.headers("INVITE", "sip:callee@proxy")
    assert params(fresh)["nonce"] == "n3" and params(reused)["nonce"] == "n2"


def test_credentials_never_show_in_repr():
    credentials = Credentials("bot", "hunter2")
    client = DigestClient(credentials)
    client.challenged(challenge_response(401, 'Digest realm="pbx", nonce="n1", qop="auth"'))
    assert "hunter2" not in repr(credentials) + repr(client) + str(credentials)


def test_credentials_from_the_environment(monkeypatch):
    monkeypatch.setenv("SIP_USERNAME", "bot")
    monkeypatch.setenv("SIP_PASSWORD", "pw")
    assert Credentials.from_env() == Credentials("bot", "pw")
    monkeypatch.delenv("SIP_PASSWORD")
    assert Credentials.from_env() is None


@pytest.mark.parametrize("value,message", [
    ("Basic realm=\"pbx\"", "not Digest"),
    ("Digest nonce=\"abc\"", "no realm"),
    ("Digest realm=\"pbx\"", "no nonce"),
    ("Digest realm=\"pbx\", nonce=\"" + "x" * 5000 + "\"", "characters long"),
    ("Digest realm=\"pbx\", nonce=\"" + "x" * 2000 + "\"", "too long"),
    ("Digest realm=\"pbx\", nonce=\"n\", algorithm=SHA-512-256", "not supported"),
    ("Digest realm=\"pbx\", nonce=\"n\", algorithm=ROT13", "not supported"),
    ("Digest realm=\"pbx\", nonce=\"n\", qop=\"auth-conf\"", "neither auth"),
    ("Digest ,,,===\"\"\"", "not a list"),
    ("Digest realm=\"pbx\" nonce=\"n\"", "not a list"),
    ("Digest realm=\"p\x01bx\", nonce=\"n\"", "not printable"),
])
def test_hostile_challenges_raise_a_clear_error(value, message):
    with pytest.raises(SIPAuthError, match=message):
        parse_challenge("WWW-Authenticate", value)
    client = DigestClient(Credentials("bot", "pw"))
    with pytest.raises(SIPAuthError):
        client.challenged(challenge_response(401, value))


def test_a_challenge_without_credentials_or_header_is_a_clear_error():
    with pytest.raises(SIPAuthError, match="no credentials"):
        DigestClient(None).challenged(challenge_response(401, 'Digest realm="pbx", nonce="n"'))
    with pytest.raises(SIPAuthError, match="without a WWW-Authenticate"):
        DigestClient(Credentials("a", "b")).challenged(challenge_response(401))
