"""Expert-parallel dispatch and the placement cost model: measured, at a GPU cluster's scale, on shaped links."""
