"""`petformers board [--output_root DIR] [--port 7860] [--host [ADDR]]`: watch and compare runs in a browser."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from petformers.errors import ConfigError

log = logging.getLogger("petformers")

LOOPBACK = "127.0.0.1"


def register(subparsers):
    p = subparsers.add_parser(
        "board", help="local web page: live loss curves, configs, evals and chat for the runs under a directory",
        description="Serve a web page listing every run under --output_root with its state, live curves "
                    "(loss, eval loss, lr, tokens/s, memory), config, before/after evaluation, artefacts, "
                    "run comparison with config diff, and a chat panel on a run's adapter. It only reads the "
                    "run directories.")
    p.add_argument("--output_root", default="output", help="directory holding the runs (default: ./output)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    p.add_argument("--host", nargs="?", const="0.0.0.0", default=LOOPBACK,
                   help="address to listen on; default 127.0.0.1 (this machine only). --host alone listens on "
                        "every interface: anyone who can reach the port sees the runs and can chat with them")
    p.set_defaults(func=run)


def run(args):
    root = Path(args.output_root)
    if not root.is_dir():
        raise ConfigError(f"--output_root {root}: no such directory")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: not a TCP port (1-65535)")
    try:
        import uvicorn

        from petformers.board.app import create_app
    except ModuleNotFoundError as e:
        raise ConfigError(f"petformers board needs the 'board' extra ({e.name} is not installed): "
                          "pip install 'petformers[board]'") from None
    local = args.host in (LOOPBACK, "localhost", "::1")
    if not local:
        log.warning("petformers: WARNING: the board listens on %s: anyone who can reach port %d can read every "
                    "run under %s and generate text with its models; there is no login", args.host, args.port,
                    root.resolve())
    hosts = [LOOPBACK, "localhost", "[::1]"] if local else None
    app = create_app(root, allowed_hosts=hosts)
    shown = "127.0.0.1" if local else args.host
    print(f"petformers board: http://{shown}:{args.port}/  (runs under {root.resolve()}; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=1)
    except OSError as e:
        raise ConfigError(f"--port {args.port}: cannot listen on {args.host} ({e.strerror or e})") from None
    return 0
