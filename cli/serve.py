"""``layershap serve``: the HTTP API over the surrogate registry (FastAPI + uvicorn).

Example:
    $ layershap serve                                   # http://127.0.0.1:8000/docs
    $ layershap serve --host 0.0.0.0 --token-file ~/.layershap-token
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

from layershap.serve.guard import is_loopback

MIN_TOKEN_CHARS = 16


def read_token(token_file: Path | None) -> str | None:
    """The token in ``token_file`` (surrounding whitespace removed), or None without a file."""
    from layershap.serve.queries import LayershapError

    if token_file is None:
        return None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise LayershapError(f"cannot read --token-file {token_file} ({exc.strerror}); give a readable file") from exc
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise LayershapError(f"the token in {token_file} must be one word of at least {MIN_TOKEN_CHARS} characters; "
                             "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE")
    return token


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 = any free port).

    Its ``proto`` is IPPROTO_TCP, as asyncio's own servers make them: asyncio switches Nagle's algorithm off
    (TCP_NODELAY) only on such sockets, and without that every keep-alive answer waits ~40 ms for a delayed ACK.
    """
    from layershap.serve.queries import LayershapError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise LayershapError(f"cannot bind {host}:{port} ({exc.strerror}); choose another --port or --host") from exc
    return sock


def serve(
    registry: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_file: Path | None = None,
    max_masks: int = 65_536,
    max_body_mb: float = 8.0,
    max_exact_layers: int = 20,
    max_budget: int = 500_000,
    workers: int = 1,
    log_level: str = "warning",
) -> int:
    """Serve layer scores, predictions, removal plans and sparsities of registered surrogates over HTTP.

    Args:
        registry: registry folder (default: $LAYERSHAP_REGISTRY, else ~/.cache/layershap/registry); read only.
        host: address to bind; anything but loopback requires --token-file.
        port: TCP port (0 = any free port; the URL is printed).
        token_file: file holding the bearer token every request must send (Authorization: Bearer TOKEN).
        max_masks: most masks in one predict request.
        max_body_mb: largest request body, in MiB.
        max_exact_layers: largest layer count for exact enumeration (scores, interactions).
        max_budget: largest Monte Carlo budget (value-function evaluations) of one scores query.
        workers: server processes sharing the port (forked; each answers one request at a time, so use up to
            one per core for many concurrent clients; each keeps its own cache).
        log_level: uvicorn log level (critical, error, warning, info, debug).
    """
    import torch
    import uvicorn

    from layershap.serve.app import create_app
    from layershap.serve.queries import LayershapError, Limits
    from layershap.serve.workers import run_workers
    from layershap.surrogate.registry import Registry, registry_root

    token = read_token(token_file)
    if token is None and not is_loopback(host):
        raise LayershapError(f"binding {host} exposes the service beyond this machine; give --token-file FILE with a "
                             "secret token (or bind 127.0.0.1)")
    if not 0 <= port <= 65535:
        raise LayershapError(f"--port {port} is outside 0..65535")
    if workers < 1:
        raise LayershapError(f"--workers must be at least 1; got {workers}")
    limits = Limits(max_body_bytes=int(max_body_mb * (1 << 20)), max_masks=max_masks,
                    max_exact_layers=max_exact_layers, max_budget=max_budget)
    reg = Registry(registry_root(registry))
    torch.set_num_threads(1)  # one request per thread: intra-op threads would only fight over the cores
    app = create_app(reg, limits, token, loopback_hosts=is_loopback(host))
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"layershap serve: registry {reg.root}; listening on http://{shown}:{sock.getsockname()[1]} "
          f"(docs at /docs){f'; {workers} worker processes' if workers > 1 else ''}", flush=True)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # the service's own log lines as uvicorn's errors
    log_config["loggers"]["layershap.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config = uvicorn.Config(app, log_level=log_level, log_config=log_config, timeout_keep_alive=30)
    return run_workers(lambda: uvicorn.Server(config).run(sockets=[sock]), workers)
