"""The test suite: unit/<floor>/ (one folder per package floor, plus architecture/ and benchmarks/),
integration/ (real launchers and multi-process runs) and helpers/ (imported as ``tests.helpers.<module>``)."""
