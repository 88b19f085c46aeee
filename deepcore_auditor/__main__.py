"""`python -m deepcore_auditor` is the `deepcore` command."""

from deepcore_auditor.auditor.cli import main

main()
