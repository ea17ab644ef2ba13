"""``python -m fusedformer info``."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedformer", description="fusedformer utilities")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, GPU, native build and backend availability with reasons")
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        from .info import info
        info()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
