"""Command-line flags shared below the commands: ``paca train``'s flags and how they become method configs (bench and
plan take the same method strings), and the help formatter every subcommand uses. Torch-free.

May import errors, base_config, extras and methods' registry; not train, files, plan, bench or cli.
"""
