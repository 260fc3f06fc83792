"""Harnesses the tests share, imported as ``from tests.helpers.<module> import ...`` from every test folder:
the repository root is on sys.path under pytest (rootdir, prepend import mode) and in the processes the tests
spawn (multiprocessing passes sys.path on); benchmarks that run by path put it there themselves."""
