"""asv benchmark suite (asv.conf.json: benchmark_dir). Run with asv; see docs/benchmarking.md."""
