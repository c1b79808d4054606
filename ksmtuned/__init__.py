"""ksmtuned: decide when the kernel's KSM runs and how hard, from memory pressure."""

__version__ = "0.1.0"
