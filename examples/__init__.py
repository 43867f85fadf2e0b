"""Runnable hami-ray workloads: ``make demo`` runs each, and so do the tests (tests/runtime/test_examples.py)."""
