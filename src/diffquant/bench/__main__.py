"""`python -m diffquant.bench ...` is `diffquant bench ...` (so that `torchrun -m diffquant.bench` shares the rows
out over the launched processes)."""

import sys

from diffquant.cli import main

if __name__ == "__main__":  # importing the module (an import walk over the package) must not start a run
    sys.argv[1:1] = ["bench"]
    main()
