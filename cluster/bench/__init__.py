"""Benchmarks, the profiler and the routing simulator behind `kvfleet bench`."""
