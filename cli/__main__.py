"""`python -m thaw.cli`: the `thaw` command."""

from thaw.cli import main

main()
