"""One module per ``sparse-mosaics`` subcommand: ``HELP``, ``add_arguments(parser)``, ``main(args)``.

Command modules are thin: they parse arguments, check them (raising
:class:`sparse_mosaics.cli.CommandError` with a message naming the bad file, key or value) and
call the library.
"""
