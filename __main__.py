"""``python -m conceptlab``: the same as the ``conceptlab`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
