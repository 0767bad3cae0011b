"""`python -m minisft.bench`: the end-to-end race (or --mode micro); see minisft/bench/__init__.py."""
import sys

from minisft.bench import main

sys.exit(main())
