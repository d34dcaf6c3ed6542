"""Test and benchmark helpers (like ``numpy.testing``): contract files written by hand, synthetic
DICOM data and ways to break it, stacking work directories, and the CLI run in a real process.

Imported by ``tests/`` and ``bench/`` alike; never by the pipeline itself.
"""
