"""easel entry point: ``python server.py [--host --port --config --model NAME=PATH ...]``."""

import sys

from server.cli import main

if __name__ == "__main__":
    sys.exit(main())
