"""Wire dialects of the Batch APIs batchd talks to."""
