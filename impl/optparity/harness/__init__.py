"""The bit-for-bit harness. bitwise.py decides sameness; matrix.py lists the cases;
runner.py runs one case; check.py runs them all; report.py shows the outcome."""
from optparity.harness.bitwise import compare, same_bits, ulp_distance
from optparity.harness.check import CheckReport, check

__all__ = ["check", "CheckReport", "compare", "same_bits", "ulp_distance"]
