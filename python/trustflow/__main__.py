"""`python -m trustflow ...` is the `trustflow` command."""

from . import main

main()
