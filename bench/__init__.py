"""Benchmarks for ufo_trio against the limit of its own stack (see docs/performance.md).

`python -m bench` runs every scenario against a bare trio-websocket reference server
(`bench.refserver`) and against `python -m ufo_trio`, and prints the ratios.
"""
