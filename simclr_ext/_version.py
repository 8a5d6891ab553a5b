# The one place the version is written: setup.py reads this file, simclr_ext.__version__ imports it.
__version__ = "0.1.0"
