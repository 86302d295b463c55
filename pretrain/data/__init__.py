"""Data: sources → tokenizer → prepared shards → batches."""
