"""``python -m voxlake.cli``."""

import os

from voxlake.cli import main

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
