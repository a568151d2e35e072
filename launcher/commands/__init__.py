"""The commands of `sharpen`, one module per group: each has register(subparsers) and COMMANDS."""
