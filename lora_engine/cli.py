"""The ``lora-engine`` command (also ``python -m lora_engine``): a dispatcher over its subcommands.

- ``demo``: fine-tune SmolLM2-135M-Instruct with LoRA or QLoRA (``lora_engine.demo``);
- ``inspect ADAPTER_DIR``: what an adapter folder holds, without loading a model (``lora_engine.cli_inspect``);
- ``merge --base --adapter --out``: a standalone merged model (``lora_engine.cli_merge``);
- ``bench``: the benchmarks (``lora_engine.bench.main``, which parses its own arguments).

Each subcommand module is imported only when it runs, so ``inspect`` never pays for the Trainer's imports.
Input problems (``UsageError``, a missing demo package) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help); each module has add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "demo": ("lora_engine.demo", "fine-tune SmolLM2-135M-Instruct on chatterbot-corpus with LoRA or QLoRA"),
    "inspect": ("lora_engine.cli_inspect", "summarise an adapter folder (no model needed)"),
    "merge": ("lora_engine.cli_merge", "merge an adapter into its base model and save a standalone model"),
}
BENCH_HELP = "benchmark lora_engine against peft (lora-engine bench --help)"
USAGE_ERROR_STATUS = 2


class UsageError(Exception):
    """A problem with the command's input (a path, a file, a mismatch) that one line on stderr explains."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lora-engine`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    from lora_engine.demo_model import MissingDemoDependency

    try:
        return module.run(args)
    except (UsageError, MissingDemoDependency) as error:
        print(f"lora-engine {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR_STATUS


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-engine", description="LoRA adapters with peft 0.21.2's API.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(subparser)
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
