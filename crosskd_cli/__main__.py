"""`python -m crosskd_cli` runs the same app as the `crosskd` console script."""

from crosskd_cli.cli import main

main()
