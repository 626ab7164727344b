"""`python -m w4a8conv.cli`: the command line, as `w4a8conv` and `python -m w4a8conv` run it."""

from . import main

main()
