"""`python -m diffquant.bench ...` is `diffquant bench ...` (so that `torchrun -m diffquant.bench` shares the rows
out over the launched processes)."""

import sys

from diffquant.cli import main

sys.argv[1:1] = ["bench"]
main()
