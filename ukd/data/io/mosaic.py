"""Siemens MOSAIC images: the slices of a volume tiled into one DICOM image, cut apart.

The slice count and the slice normal live only in Siemens' private CSA header, which
nibabel reads (`nibabel.nicom.csareader`); without them no volume can be made, so such a
file is refused in one line rather than predicted as a volume of tiles.
"""

import numpy as np

from ukd.errors import DataError, error


def demosaic(ds, stored: np.ndarray, geometry: list, where: str):
  """A Siemens MOSAIC (ImageType MOSAIC: the slices of a volume tiled row by row into one
  image, their count only in the private CSA header) -> (tiles [n, rows, cols], geometry of
  each). ImagePositionPatient is the corner of the whole mosaic: the first tile's corner lies
  half the untiled margin further along the rows and columns; tile k lies k slice spacings
  along the CSA slice normal (which may point against the rows x columns cross product)."""
  from nibabel.nicom import csareader

  if len(stored) != 1:
    raise error(DataError, where, f"MOSAIC of {len(stored)} frames: expected one tiled image")
  try:
    csa = csareader.get_csa_header(ds, "image")
    count = csareader.get_n_mosaic(csa) if csa else None
    normal = csareader.get_slice_normal(csa) if csa else None
  except Exception as exc:  # a damaged private header
    raise error(
      DataError, where, f"Siemens MOSAIC whose CSA header cannot be read ({exc}): cannot demosaic"
    ) from exc
  if not count or normal is None:
    raise error(
      DataError,
      where,
      "Siemens MOSAIC without NumberOfImagesInMosaic and the slice normal (its CSA image "
      "header): cannot demosaic",
    )
  rows, cols = stored.shape[1:]
  side = int(np.ceil(np.sqrt(count)))
  if rows % side or cols % side:
    raise error(
      DataError,
      where,
      f"Siemens MOSAIC of {count} images (CSA NumberOfImagesInMosaic) that do not tile its "
      f"{rows}x{cols} pixels: cannot demosaic",
    )
  tile_rows, tile_cols = rows // side, cols // side
  tiles = stored[0].reshape(side, tile_rows, side, tile_cols).transpose(0, 2, 1, 3)
  tiles = tiles.reshape(side * side, tile_rows, tile_cols)[:count]
  orientation, position, spacing, thickness, slope, intercept = geometry[0]
  row_dir, col_dir = orientation[:3], orientation[3:]
  first = position + row_dir * spacing[1] * (cols - tile_cols) / 2
  first = first + col_dir * spacing[0] * (rows - tile_rows) / 2
  step = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
  normal = np.asarray(normal, np.float64) / np.linalg.norm(normal)
  geometry = [
    (orientation, first + k * step * normal, spacing, thickness, slope, intercept)
    for k in range(count)
  ]
  return tiles, geometry
