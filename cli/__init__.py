"""Command-line shell of sppdet (installed as the import package ``sppdet_cli``)."""
