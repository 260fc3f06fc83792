"""SFT on real ShareGPT conversations: the data, packed vs padded throughput, a training run."""
