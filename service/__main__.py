"""`python -m service [--host H] [--port P]`: serve the API (settings from DISTILL_* environment variables)."""

from __future__ import annotations

import argparse

from service.app import serve
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", help="interface to listen on (default: DISTILL_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: DISTILL_PORT or 8000)")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    serve(Settings(**overrides))


if __name__ == "__main__":
    main()
