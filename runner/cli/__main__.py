"""`python -m runner.cli ...`: the same command as the installed `runner`."""

from runner.cli import main

main()
