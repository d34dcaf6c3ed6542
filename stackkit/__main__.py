"""`python -m stackkit ...`: the same command line as `python cli.py` and the `stackkit` script."""

from stackkit.cli import main

main()
