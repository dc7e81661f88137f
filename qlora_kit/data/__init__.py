"""Training data: records in, chat messages, then token ids with labels, then batches."""
