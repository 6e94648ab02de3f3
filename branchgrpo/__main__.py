"""``python -m branchgrpo train CONFIG`` (see :mod:`branchgrpo.cli`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
