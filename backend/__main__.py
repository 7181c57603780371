"""`python -m backend`: the same as the `abn` command."""

from backend.cli import main

main()
