"""The ``postsense`` subcommands, one module each, with ``add_arguments(parser)`` and ``run(args, settings) -> int``.

Only argument parsing and exit codes live here; what a command does is in the library modules of
``stream`` (``runtime``, ``feed``, ``offline``, ``components``, ``local_services``) so the Python API and the tests use
the same code.
"""
