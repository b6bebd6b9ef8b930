"""Serving: the live Segmenter, sliding windows, input discovery, the prediction pipeline, export and the exported-model runners."""
