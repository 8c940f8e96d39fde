"""The ``lora-engine`` command (also ``python -m lora_engine``): parses the command line and dispatches.

- ``demo``: fine-tune SmolLM2-135M-Instruct with LoRA or QLoRA (``lora_engine.demo.command``);
- ``inspect ADAPTER_DIR``: what an adapter folder holds, without loading a model (``lora_engine.cli.inspect``);
- ``merge --base --adapter --out``: a standalone merged model (``lora_engine.cli.merge``);
- ``bench``: the benchmarks (``lora_engine.bench.main``, which parses its own arguments).

The subcommands are listed from ``SUBCOMMANDS`` alone: ``lora-engine --help`` imports none of their modules, and
``lora-engine NAME ...`` imports only NAME's. Each module has ``add_arguments(parser)`` and ``run(args) -> int``
and imports ``UsageError`` from ``lora_engine.cli.errors``, never from here. A ``UsageError`` prints one line on
stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from lora_engine.cli.errors import UsageError

# subcommand -> (module, one-line help); each module has add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "demo": (
        "lora_engine.demo.command",
        "fine-tune SmolLM2-135M-Instruct on chatterbot-corpus with LoRA or QLoRA",
    ),
    "inspect": ("lora_engine.cli.inspect", "summarise an adapter folder (no model needed)"),
    "merge": ("lora_engine.cli.merge", "merge an adapter into its base model and save a standalone model"),
}
BENCH_HELP = "benchmark lora_engine against peft (lora-engine bench --help)"
USAGE_ERROR_STATUS = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lora-engine`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    ``--help``, a missing or unknown subcommand and bad arguments exit through argparse (``SystemExit``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top-level parser has no options but --help, so a subcommand can only be the first argument.
    command = argv[0] if argv else None
    if command == "bench":
        return _run_bench(argv[1:])
    module = importlib.import_module(SUBCOMMANDS[command][0]) if command in SUBCOMMANDS else None
    args = _build_parser(command, module).parse_args(argv)
    # parse_args has exited unless argv named a subcommand, so `module` is that subcommand's.
    try:
        return module.run(args)
    except UsageError as error:
        print(f"lora-engine {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR_STATUS


def _build_parser(command: str | None, module: ModuleType | None) -> argparse.ArgumentParser:
    """The parser listing every subcommand; only ``command``'s subparser gets its arguments (from ``module``)."""
    parser = argparse.ArgumentParser(prog="lora-engine", description="LoRA adapters with peft 0.21.2's API.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module.add_arguments(subparser)
    subparsers.add_parser("bench", help=BENCH_HELP, add_help=False)  # listed here, parsed by the bench itself
    return parser


def _run_bench(argv: list[str]) -> int:
    try:
        from lora_engine.bench import main as bench_main
    except ImportError:
        print(
            "lora-engine bench: error: this build of lora_engine has no benchmark entry point "
            "(lora_engine.bench.main is missing)",
            file=sys.stderr,
        )
        return USAGE_ERROR_STATUS
    return bench_main(argv)
