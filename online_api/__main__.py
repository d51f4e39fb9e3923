"""Serve the online API: ``python -m online_api --host 0.0.0.0 --port 8000`` (one worker, uvloop/httptools
when installed). Settings come from the environment (``ONEREC_*``, see `services.config.Settings`)."""

from __future__ import annotations

import argparse
import importlib.util

from services.catalog import exit_if_invalid
from services.config import get_settings


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m online_api", description="Serve the OneRec-Think online API.")
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.add_argument("--access-log", action="store_true", help="log every request (slower)")
    args = p.parse_args(argv)
    exit_if_invalid(get_settings().data_dir)  # bad data: one line per problem, before the app loads a model
    uvicorn.run(
        "online_api.app:create_app", factory=True, host=args.host, port=args.port, workers=1,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_level=args.log_level, access_log=args.access_log,
    )  # fmt: skip


if __name__ == "__main__":
    main()
