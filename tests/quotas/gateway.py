"""A quota-enforcing echo gateway in a process of its own, for the multi-process tests.

    python -m tests.quotas.gateway --key-prefix P --requests-per-minute 5

It serves the echo service behind the errors, (anonymous) auth and quota interceptors, with the
Redis quota store, on a free port of 127.0.0.1; prints that port on one line;
and serves until its standard input closes or it is signalled.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tokenwire.auth.config import AuthConfig
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.config import LoggingConfig
from tokenwire.interceptors import ErrorsInterceptor
from tokenwire.logs import configure_logging
from tokenwire.quotas import PlanLimits, QuotaConfig
from tokenwire.quotas.interceptor import QuotaInterceptor
from tokenwire.testing.echo import running_echo_server


def _config(argv: list[str]) -> QuotaConfig:
    parser = argparse.ArgumentParser(prog="python -m tests.quotas.gateway")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--key-prefix", required=True)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--lease-ttl-s", type=float, default=30.0)
    parser.add_argument("--requests-per-minute", type=int, default=0)
    parser.add_argument("--concurrent-streams", type=int, default=0)
    args = parser.parse_args(argv)
    plan = PlanLimits(
        requests_per_minute=args.requests_per_minute, concurrent_streams=args.concurrent_streams
    )
    return QuotaConfig(
        store="redis",
        redis_url=args.redis_url,
        key_prefix=args.key_prefix,
        window_s=args.window_s,
        lease_ttl_s=args.lease_ttl_s,
        plans={"default": plan},
    )


async def serve(config: QuotaConfig) -> None:
    """Serve until standard input closes."""
    quotas = QuotaInterceptor(config)
    await quotas.start()
    try:
        anonymous = AuthInterceptor(AuthConfig(enabled=False), "")
        async with running_echo_server([ErrorsInterceptor(), anonymous, quotas]) as echo:
            print(echo.address.rsplit(":", 1)[1], flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await quotas.close()


if __name__ == "__main__":
    configure_logging(LoggingConfig(level="warning"))
    asyncio.run(serve(_config(sys.argv[1:])))
