"""`python -m model`: the model library on its own."""

from model.cli import main

main()
