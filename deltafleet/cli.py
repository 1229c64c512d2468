"""`deltafleet` command: a thin dispatcher to each subpackage's own CLI module.

Each command lives with the code it drives and is imported only when used, so
`deltafleet operator` never imports torch and `deltafleet compress` never imports kopf.
Every target module exposes `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "compress": ("deltafleet.compress.cli", "compress a fine-tune into a 1-bit delta against its base"),
    "merge": ("deltafleet.compress.merge_cli", "merge a delta back into a full Hugging Face checkpoint"),
    "inspect": ("deltafleet.compress.inspect_cli", "print a delta file's metadata, sizes and ratio"),
    "serve": ("deltafleet.serving.cli", "run a pool (one base, many deltas) locally on Ray Serve"),
    "operator": ("deltafleet.operator.cli", "run the Kubernetes operator (kopf)"),
    "crds": ("deltafleet.operator.crdgen", "print or write the CRD YAML generated from the pydantic models"),
    "demo": ("deltafleet.demo", "build a toy base + fine-tune pair, compress it and show the result"),
}


ML_COMMANDS = ("compress", "merge", "serve", "demo")


def usage() -> str:
    lines = ["usage: deltafleet <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`deltafleet <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from deltafleet import __version__

        print(__version__)
        return 0
    # Ray and the compressor fork after tokenizers ran; its thread pool would warn on every fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"deltafleet: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name in ML_COMMANDS:  # off a terminal: one line per stage, not a redrawn bar per step
        from deltafleet.compress.progress import quiet_library_bars

        quiet_library_bars()
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)
