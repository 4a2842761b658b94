"""The ``dbae`` command line (see :mod:`dbae.cli.main`)."""
