"""optparity.bench — step latency and memory of optparity vs torch.optim, over time.

  workloads.py   parameter shapes, implementations, optimizer builders (shared with suites/benchmarks)
  bandwidth.py   bytes moved per element per step; the streaming-copy roofline
  measure.py     torch.utils.benchmark timing, state bytes and step temporaries per case
  report.py      Markdown / HTML / matplotlib report of a run
  compare.py     `optparity report --compare`: ratios and the regression verdict
  distributed.py rank-side code of the ZeRO and post-local-SGD asv benchmarks
  cli.py         the `bench` and `report` subcommands
"""
