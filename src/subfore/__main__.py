"""``python -m subfore`` runs the command line."""

from .cli import main

main()
