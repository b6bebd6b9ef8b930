"""Data: dataset adapters (one per layout) -> cases -> volumes -> preprocessing (cached) -> training batches; the split; readers and writers (`io`); phantoms (`synthetic`)."""
