"""The ``gpuce`` command: ``gpuce bench``, ``gpuce demo`` and ``gpuce warmup``."""
import argparse
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="gpuce", description=__doc__)
    parser.add_argument("command", choices=["bench", "demo", "warmup"], help="what to run")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "bench":
        from .bench import main as run
    elif args.command == "warmup":
        from ._warmup import main as run
    else:
        from .demo import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
