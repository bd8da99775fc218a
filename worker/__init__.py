"""The worker runtime: pull jobs when a slot is free, run them on a backend, stream events back."""
