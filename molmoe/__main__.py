"""`python -m molmoe ...`: the `molmoe` command (same arguments, output and exit codes)."""
import sys

from molmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
