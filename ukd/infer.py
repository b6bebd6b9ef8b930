"""The public face of a trained model in Python: `ukd.infer.load(workdir)` gives a Segmenter.

    from ukd import infer
    seg = infer.load("runs/mmwhs")
    labels = seg.predict_file("scan.nii.gz", "labels.nii.gz", "ct")

The implementation lives in `ukd.serve.segmenter`.
"""

from ukd.serve.segmenter import Segmenter, load

__all__ = ["Segmenter", "load"]
