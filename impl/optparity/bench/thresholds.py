"""The decision rule's defaults, apart from decide.py so that building the command line (every
`optparity` run, `check` included) does not import numpy, pandas and scipy for two numbers."""
MIN_EFFECT = 0.03    # smallest slowdown worth calling: 3 % (a planted 5 % must be caught)
FDR = 0.05           # Benjamini-Hochberg false discovery rate over the benchmarks compared at once
