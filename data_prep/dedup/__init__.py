"""gptforge.data_prep.dedup: URL, exact and MinHash-LSH near-duplicate removal."""
