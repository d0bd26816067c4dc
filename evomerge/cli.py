"""Command line: thin wiring from arguments to library calls.

Errors the user can fix (EvomergeError) print as one line without a traceback; --debug shows it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from evomerge import __version__
from evomerge.errors import EvomergeError

log = logging.getLogger("evomerge")


def _cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.engine import merge_to_checkpoint
    from evomerge.recipe import Recipe

    recipe = Recipe.load(args.recipe)
    for unknown in recipe.unknown_parameters():
        log.warning("%s: not a parameter of %s; ignored (as mergekit does)", unknown, recipe.merge_method)
    out = merge_to_checkpoint(
        recipe, args.out_dir, device=args.device, seed=args.seed, allow_bin=args.allow_bin,
        progress=not args.quiet,
    )
    print(f"merged model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser("merge", help="merge a mergekit recipe into a Hugging Face checkpoint (like mergekit-yaml)")
    merge.add_argument("recipe", help="mergekit YAML recipe")
    merge.add_argument("out_dir", help="output directory")
    merge.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    merge.add_argument("--seed", type=int, default=0, help="seed for random-drop methods (dare, della)")
    merge.add_argument("--allow-bin", action="store_true", help="allow pickled pytorch_model.bin sources")
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    merge.set_defaults(func=_cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    from evomerge.log import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        return args.func(args)
    except EvomergeError as exc:
        if args.debug:
            raise
        print(f"evomerge: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
