"""The `simclr-ext` command line."""
import argparse
import json
import sys


def _info(args):
    from .info import info

    print(json.dumps(info(), indent=2))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="simclr-ext", description="Fused SimCLR training tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print the build and runtime configuration as JSON")
    p_info.set_defaults(func=_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
