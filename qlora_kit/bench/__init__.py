"""The measuring harness: benchmarks, memory and speed measurements, random models and synthetic data.

Training, the planner and the export never import it (tests/test_layout.py checks the import graph);
tools/ and the tests do.
"""
