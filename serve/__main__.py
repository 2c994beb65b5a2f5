"""`python -m serve`: run the server (no TensorFlow needed)."""

import sys

from serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
