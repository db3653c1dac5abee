"""`tandem bench`: the load-testing harness (arrivals, workloads, runner, metrics, reports, CLI).

Depends only on the Tandem client (grpc + the generated protos); plots need matplotlib.
"""
