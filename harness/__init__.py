"""Real processes for the tests and the benchmarks: the one home both import.

`tests/` and `bench/` never import each other; what they share lives here.
What belongs in this package:

- starting our services as real processes (`python -m <service>`) on
  loopback ports chosen at run time (`procs.free_port`), with a log file each;
- readiness by gRPC health (`procs.Proc.wait_serving`), never by sleeping;
- stopping by PID (SIGTERM, then SIGKILL), never by process name;
- whole request paths built from those processes (`stack`: shard, replicas,
  HAProxy, frontend), and fault tools for them (`disk`: a private tmpfs that
  really fills up);
- the load generators: steady closed-loop load with a record of every call
  (`load`), and the seeded impatient-client storm (`impatient`, also a CLI:
  `python -m harness.impatient`);
- where result files go (`results`).

What does not belong: assertions, pytest fixtures and anything that decides
what a benchmark measures. Those stay in `tests/` and `bench/`.
"""
