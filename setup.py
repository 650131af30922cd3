"""Only the optional C extension lives here; everything else is in setup.cfg.

optional=True: without a C compiler the install still succeeds and pop3d runs on the Python
versions of the same loops (pop3d/bulk.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pop3d._speedups", ["pop3d/_speedups.c"], optional=True)])
