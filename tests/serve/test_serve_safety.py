"""Bad requests get the right 4xx with a message saying what to fix, and the server still answers after each;
the token is required on every request when the server has one; binding beyond loopback needs a token."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from serve_support import N_TINY, Server, tiny_surrogate

from layershap import Client
from layershap.cli.serve import is_loopback, serve
from layershap.core.errors import LayershapError
from layershap.serve.client import ServiceError
from layershap.surrogate.checkpoint import load_surrogate
from layershap.surrogate.registry import Registry

TINY = "tiny-synthetic"
TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("safety")
    tiny = tiny_surrogate(base / "tiny")
    Registry(base / "registry").add(tiny)
    token_file = base / "token"
    token_file.write_text(TOKEN + "\n")
    srv = Server(base / "registry", token_file=token_file, max_exact_layers=10, max_budget=5000, max_masks=100,
                 max_body_mb=0.25)
    yield srv, load_surrogate(tiny)
    srv.stop()


def _client(srv, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=srv.url, headers=headers, timeout=60)


def _still_answers(srv) -> None:
    assert srv.alive()
    with _client(srv) as c:
        assert c.get("/v1/health").json()["status"] == "ok"


ONE = [[1] * N_TINY]
BAD_REQUESTS = [
    # (method, path, raw body or json, status, words the message must contain)
    ("POST", f"/v1/surrogates/{TINY}/predict", b'{"masks": [[1, 0', 400, "not valid JSON"),
    ("POST", f"/v1/surrogates/{TINY}/predict", b"\xff\xfe garbage", 400, "not valid JSON"),
    ("POST", f"/v1/surrogates/{TINY}/predict", b'{"masks": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
     "nested too deeply"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": [[1, 0, 1]]}, 400, "8 decoder layers"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": [[1] * N_TINY, [1] * (N_TINY + 1)]}, 400, "mask 1 has 9"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": [["yes?"] * N_TINY]}, 422, "masks.0.0"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": []}, 422, "at least 1"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"mask": ONE}, 422, "mask: Extra inputs"),
    ("POST", f"/v1/surrogates/{TINY}/predict", [1, 2], 422, "valid dictionary"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": ONE * 101}, 400, "at most 100"),
    ("POST", "/v1/surrogates/no-such-model/predict", {"masks": ONE}, 404, "no surrogate 'no-such-model'"),
    ("GET", "/v1/surrogates/no-such-model", None, 404, "registry list"),
    ("GET", "/v1/surrogates/.hidden", None, 400, "invalid entry id"),
    ("GET", "/v1/surrogates/..%2F..%2Fetc", None, 404, "no route"),
    ("GET", "/v1/nothing-here", None, 404, "/docs"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "k", "k": 2}}, 422, "index"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "semivalue", "sizes": "3:99"}}, 400, "outside 1..8"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "semivalue", "sizes": "a:b"}}, 400, "A:B"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "shapley", "sizes": "1:2"}}, 422, "sizes"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"method": "mc", "budget": 10**7}, 400, "Monte Carlo cap"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"method": "magic"}, 422, "method"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "banzhaf"}, "method": "mc-permutation"}, 400,
     "Shapley value only"),
    ("POST", f"/v1/surrogates/{TINY}/removal-sets", {"k": 8}, 400, "choose 1 <= k <= 7"),
    ("POST", f"/v1/surrogates/{TINY}/removal-sets", {"k": 2, "depth_fraction": 0.2}, 422, "exactly one"),
    ("POST", f"/v1/surrogates/{TINY}/removal-sets", {"k": 2, "top": 1000}, 400, "top must be <= 50"),
    ("POST", f"/v1/surrogates/{TINY}/sparsities", b'{"target": NaN}', 422, "target"),
    ("POST", f"/v1/surrogates/{TINY}/sparsities", {"target": 1.5}, 422, "target"),
    ("POST", f"/v1/surrogates/{TINY}/sparsities", {}, 422, "target: Field required"),
]


@pytest.mark.parametrize("method,path,body,status,words", BAD_REQUESTS)
def test_bad_request_gets_4xx_and_server_still_answers(server, method, path, body, status, words):
    srv, _ = server
    with _client(srv) as c:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
        resp = c.request(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]
    _still_answers(srv)


def test_oversized_bodies_are_refused(server):
    srv, _ = server
    big = b'{"masks": [' + b",".join([b"[1,1,1,1,1,1,1,1]"] * 20_000) + b"]}"  # ~360 kB > 0.25 MiB
    with _client(srv) as c:
        resp = c.post(f"/v1/surrogates/{TINY}/predict", content=big)
        assert resp.status_code == 413 and "limit of 262,144 bytes" in resp.json()["error"]
        chunked = c.post(f"/v1/surrogates/{TINY}/predict", content=iter([big[i:i + 4096]
                                                                          for i in range(0, len(big), 4096)]))
        assert chunked.status_code == 413  # no Content-Length: counted while read
    _still_answers(srv)


def test_token_is_checked_on_every_request(server):
    srv, sur = server
    for path in ("/v1/health", "/v1/surrogates", f"/v1/surrogates/{TINY}", "/docs", "/openapi.json"):
        with _client(srv, token=None) as c:
            resp = c.get(path)
            assert resp.status_code == 401 and "Authorization: Bearer" in resp.json()["error"]
        with _client(srv, token="wrong-token-0123456789") as c:
            assert c.get(path).status_code == 403
        with _client(srv) as c:
            assert c.get(path).status_code == 200
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Basic {TOKEN}"}) as c:
        assert c.get("/v1/health").status_code == 403
    with _client(srv, token=None) as c:
        assert c.post(f"/v1/surrogates/{TINY}/predict", json={"masks": [[1] * N_TINY]}).status_code == 401
    with Client(srv.url, token=TOKEN) as client:
        masks = np.eye(N_TINY, dtype=bool) | np.eye(N_TINY, k=1, dtype=bool)
        nll, _std = client.predict(TINY, masks)
        np.testing.assert_allclose(nll, sur.predict_nll(masks), rtol=1e-12)
    with Client(srv.url) as client, pytest.raises(ServiceError, match="401"):
        client.health()
    _still_answers(srv)


def test_non_loopback_needs_a_token(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with pytest.raises(LayershapError, match="--token-file"):
        serve(registry=tmp_path, host="0.0.0.0", port=0)
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(LayershapError, match="at least 16"):
        serve(registry=tmp_path, host="0.0.0.0", port=0, token_file=short)
    with pytest.raises(LayershapError, match="cannot read --token-file"):
        serve(registry=tmp_path, token_file=tmp_path / "absent")


def test_accepted_connections_have_nagle_off():
    """Keep-alive answers must not wait ~40 ms for a delayed ACK: asyncio sets TCP_NODELAY on the sockets it
    accepts only when the listening socket's proto is IPPROTO_TCP, which `bind` ensures."""
    import asyncio
    import socket

    from layershap.cli.serve import bind

    sock = bind("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    flags = []

    async def main() -> None:
        def handle(reader, writer) -> None:
            flags.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        for _ in range(100):
            if flags:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        await server.wait_closed()

    busy = bind("127.0.0.1", 0)
    with pytest.raises(LayershapError, match="cannot bind"):
        bind("127.0.0.1", busy.getsockname()[1])  # a port in use: refused with a message, not a traceback
    busy.close()
    asyncio.run(main())
    assert flags == [1]
