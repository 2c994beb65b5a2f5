"""`python -m serve`: run the server (no TensorFlow needed)."""

import sys

from serve.cli import main

sys.exit(main())
