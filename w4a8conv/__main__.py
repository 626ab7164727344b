"""`python -m w4a8conv`: the same command line as `w4a8conv`."""

from .cli import main

main()
