"""sharpen's user-facing side: the job file, the plan, the command line."""

__version__ = "0.1.0"
