"""The public face of an exported model: `ukd.exported.load(folder, backend=...)`.

    from ukd import exported
    model = exported.load("export/", backend="onnxruntime")
    model.predict_file("scan.nii.gz", "labels.nii.gz", "ct")

Runs with numpy, scipy, nibabel and the chosen backend only; the implementation lives in
`ukd.serve.runners`.
"""

from ukd.serve.runners import ExportedModel, load

__all__ = ["ExportedModel", "load"]
