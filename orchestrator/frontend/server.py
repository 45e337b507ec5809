"""`disagg openai`: the OpenAI-compatible HTTP server in front of a tritonserver's ensemble.

    disagg openai --triton-url 127.0.0.1:8001 --port 9000 --host 127.0.0.1 \\
        [--model-name disagg] [--tokenizer-dir DIR]

Also `python -m orchestrator.frontend.server ...` (how `disagg serve` starts it next to
tritonserver). It listens on loopback by default: it has no authentication of its own.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

import uvicorn

from orchestrator.frontend.app import DEFAULT_CHAT_MAX_TOKENS, FrontendConfig, create_app


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="gRPC HOST:PORT of tritonserver")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--model-name", default="disagg", help="the model name clients use (GET /v1/models)")
    p.add_argument("--ensemble", default="ensemble", help="the Triton model requests go to")
    p.add_argument("--tokenizer-dir", default=None, help="Hugging Face tokenizer folder (its chat template)")
    p.add_argument(
        "--default-max-tokens", type=int, default=DEFAULT_CHAT_MAX_TOKENS,
        help="max_tokens of a chat request that sets neither max_tokens nor max_completion_tokens",
    )  # fmt: skip
    p.add_argument("--log-level", default="warning")
    p.add_argument("--log-requests", action="store_true", help="one line per finished request, with its id")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = FrontendConfig(
        triton_url=args.triton_url, model_name=args.model_name, ensemble=args.ensemble,
        tokenizer_dir=args.tokenizer_dir, default_max_tokens=args.default_max_tokens, log_requests=args.log_requests,
    )  # fmt: skip
    if args.log_requests:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("disagg.frontend").setLevel(logging.INFO)
    print(f"openai frontend on http://{args.host}:{args.port}/v1 -> {args.triton_url} ({args.ensemble})", flush=True)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
