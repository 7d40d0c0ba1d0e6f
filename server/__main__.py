"""`python -m unetpp.server [--models DIR] [--host H] [--port P]`: the same as `unetpp serve`."""

from __future__ import annotations

import sys

from unetpp.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
