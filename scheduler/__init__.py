"""Admission and placement: which jobs run, and on which pool's queue."""
