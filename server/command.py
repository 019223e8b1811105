"""The ``easel`` command of an installed easel (``pip install .``):

* ``easel serve [--host --port --config --model NAME=PATH ...]`` runs the server, as
  ``python3 server.py`` does in a checkout;
* ``easel generate|edit|status|cancel|models ...`` is the command-line client
  (``clients/cli.py``, ``python -m clients`` in a checkout)."""

from __future__ import annotations

import sys

SERVE_HELP = "easel serve [--host --port --config ...] runs the server (easel serve --help)"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        from .cli import main as serve

        return serve(args[1:], prog="easel serve")
    from clients.cli import main as client

    return client(args, prog="easel", epilog=SERVE_HELP)


if __name__ == "__main__":
    sys.exit(main())
