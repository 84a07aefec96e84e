import sys

from .run import main

if __name__ == "__main__":  # not when a spawned process (benchmarks/precompile.py) imports it as __mp_main__
    sys.exit(main())
