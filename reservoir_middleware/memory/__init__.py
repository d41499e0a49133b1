"""The memory engine's parts that know no storage: reading, writing, tokens, embeddings."""
