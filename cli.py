"""`python cli.py ...`: a shim for the command line in :mod:`stackkit.cli`."""

from stackkit.cli import main

if __name__ == "__main__":
    main()
