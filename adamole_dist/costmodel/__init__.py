"""The placement cost model behind ``--ep_size auto`` (placement.py) and its calibration on this
machine (calibration.py). Top floor: train/assembly.py and the benchmarks use it; nothing in the
package below imports it (tests/unit/architecture/test_layering.py)."""
