"""Benchmarks of ksmtuned against the old bash daemon and the kernel's own KSM tuning (issue 5).

``python -m bench [--quick] [--out DIR] [--only LIST] [--soak] [--readme PATH]``; see __main__.
"""
