"""`dfastllm` command line: `dfastllm serve [options]`.

Every ServerConfig field is a flag here and a DFASTLLM_* environment
variable; the flag wins. Torch-free: the supervisor never loads the model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dfastllm import __version__
from dfastllm.config import ServerConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfastllm", description="A server for masked-diffusion language models.")
    parser.add_argument("--version", action="version", version=f"dfastllm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve a model over the OpenAI-compatible HTTP API",
        description="Serve a model over the OpenAI-compatible HTTP API. Every option may also be given as an "
                    "environment variable DFASTLLM_<OPTION> (e.g. DFASTLLM_MAX_BATCH_SIZE); the flag wins.")
    ServerConfig.add_arguments(serve)
    serve.set_defaults(command_parser=serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would report them under the top-level usage; the command's is the useful one
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        try:
            config = ServerConfig.from_args(args)
        except ValueError as error:
            print(f"dfastllm serve: error: {error}", file=sys.stderr)
            return 2
        missing = missing_checkpoint(config.model)
        if missing:
            print(f"dfastllm serve: error: {missing}", file=sys.stderr)
            return 2
        from dfastllm.supervisor import serve

        return serve(config)
    raise AssertionError(f"unhandled command {args.command!r}")


def missing_checkpoint(model: str | None) -> str | None:
    """Why the configured model cannot be served, found before any process
    starts (a hub id is left to the engine, which downloads it)."""
    import os

    from dfastllm.checkpoints import DEFAULT_MODEL_DIR, is_local_path

    path = os.path.abspath(os.path.expanduser(model or DEFAULT_MODEL_DIR))
    if model is not None and not is_local_path(os.path.expanduser(model)):
        return None
    what = "the embedded default model" if model is None else "checkpoint directory"
    if not os.path.exists(path):
        return f"{what} {path} does not exist"
    if not os.path.isdir(path):
        return f"{what} {path} is not a directory"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"{what} {path} has no config.json (is it a LLaDA or Dream checkpoint?)"
    return None


if __name__ == "__main__":
    sys.exit(main())
