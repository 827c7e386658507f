"""The command-line programs, inside the package so pip installs them as console scripts
(`dithead-train`, `dithead-preprocess`, ...; see pyproject.toml). Each module has
`main(argv=None) -> int`; the top-level scripts (train.py, data/*.py, ...) only call it."""
