"""Finding the DICOM series in a folder tree or a .zip, and reading them one by one.

A PACS export or a CD copy holds files with any name (or none), in any folders, in any
order, often several series side by side. Files are recognised by their content (the
'DICM' marker), grouped by SeriesInstanceUID and read with `ukd.data.io.dicom`. `find_series`
only lists; `read_series` raises a one-line DataError for a series that cannot be read, so a
caller goes through the list, predicts the good series and reports each bad one:

  for series in find_series(path):
    try:
      image = read_series(series)
    except DataError as e:
      report(e)

Output names (`Series.name`): the input's folder (or zip) name when it holds one series,
`<folder>_<SeriesNumber>` when it holds several (SeriesNumber 0 where it is missing, and
`_2`, `_3`... added where two series share a number).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import MutableSequence

from ukd import files
from ukd.data.io.dicom import DicomImage, import_pydicom, read_files
from ukd.errors import DataError, error

# DICOM Modality tag -> ukd modality name; a config field can replace it.
DEFAULT_MODALITY_TABLE = {"CT": "ct", "MR": "mr"}
# The Modality tag of every MR sequence: which sequence a series is only its other tags say.
MR_TAG = "MR"

# A DICOMDIR indexes the files of a CD; it holds no image.
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_DISCOVERY_TAGS = (
  "SeriesInstanceUID",
  "StudyInstanceUID",
  "SeriesNumber",
  "SeriesDescription",
  "Modality",
  "SOPClassUID",
  "ScanningSequence",
  "SequenceName",
)


@dataclasses.dataclass(frozen=True)
class Series:
  """One series found by `find_series`: its identity, files and output name.

  `root` is the folder or zip given to `find_series` (errors name it), `folder` where the
  files lie (`root`, or where the zip was unpacked). `problem` is set for a DICOM file whose
  header cannot be read (or that names no series): it stands alone and `read_series` reports
  the problem.  `scanning_sequence` (multiple values joined by '\\', as DICOM writes them) and
  `sequence_name` tell MR sequences apart (`match_sequence`).
  """

  name: str
  series_uid: str
  study_uid: str
  number: int | None
  modality: str
  description: str
  files: tuple[str, ...]
  root: str
  folder: str
  problem: str | None = None
  scanning_sequence: str = ""
  sequence_name: str = ""

  @property
  def source(self) -> str:
    """How errors name the series."""
    return f"series {self.name} in {self.root}"


def _input_name(path: str) -> str:
  """The folder's (or zip's, or file's) own name, for output names."""
  name = os.path.basename(os.path.normpath(os.path.abspath(path)))
  stem, extension = os.path.splitext(name)
  return stem if extension.lower() in (".zip", ".dcm") else name


def _extract(path: str, into: str | None) -> str:
  """Unpack a zip (local or remote) into `into`, or a temporary folder removed at exit."""
  if into is None:
    into = tempfile.mkdtemp(prefix="ukd-dicom-")
    atexit.register(shutil.rmtree, into, True)
  try:
    with files.local_file(path) as local, zipfile.ZipFile(local) as archive:
      archive.extractall(into)  # member names are made safe (no absolute paths, no ..)
  except (zipfile.BadZipFile, OSError) as exc:
    raise error(DataError, path, f"cannot unpack zip ({type(exc).__name__}: {exc})") from exc
  return into


def is_dicom_file(path) -> bool:
  """Whether the file at `path` is DICOM by its content (the 'DICM' marker), whatever its name."""
  pydicom = import_pydicom()
  with files.local_file(os.fspath(path)) as local:
    return pydicom.misc.is_dicom(local)


def _header(pydicom, path: str):
  """The identifying tags of a DICOM file, None when it is not DICOM or is a DICOMDIR."""
  with files.local_file(path) as local:
    if not pydicom.misc.is_dicom(local):
      return None
    ds = pydicom.dcmread(local, stop_before_pixels=True, specific_tags=list(_DISCOVERY_TAGS))
  if ds.file_meta.get("MediaStorageSOPClassUID") == _MEDIA_DIRECTORY:
    return None
  return ds


def _number(ds) -> int | None:
  try:
    return int(ds.SeriesNumber)
  except (AttributeError, TypeError, ValueError):
    return None


def find_series(path, extract_to: str | None = None) -> list[Series]:
  """The DICOM series under a folder (searched recursively), in a .zip file, or the one
  series of a single DICOM file (a lone slice or a multi-frame image someone was sent).

  A zip is unpacked into `extract_to`, or a temporary folder removed when Python exits (the
  returned records point into it). A folder on cloud storage works too, each file fetched to
  look at it. Series come sorted by SeriesNumber, then the unreadable files (`problem`); a
  folder without any DICOM file is an error.
  """
  pydicom = import_pydicom()
  path = os.fspath(path)
  root = files.Path(path)
  single = None
  if root.is_file() and path.lower().endswith(".zip"):
    folder = _extract(path, extract_to)
  elif root.is_dir():
    folder = path
  elif root.is_file() and is_dicom_file(path):
    folder, single = os.path.dirname(path), [path]
  else:
    raise error(DataError, path, "not a DICOM file, a folder or a .zip file")
  found = single or [
    files.join(top, name) for top, _, names in files.walk(folder) for name in names
  ]
  groups: dict[str, list] = {}
  problems: list[Series] = []
  for candidate in sorted(found):
    relative = os.path.relpath(candidate, folder) if not files.is_remote(candidate) else candidate
    try:
      ds = _header(pydicom, candidate)
      problem = None if ds is None or ds.get("SeriesInstanceUID") else "no SeriesInstanceUID"
    except Exception as exc:  # a truncated or malformed header
      ds, problem = None, f"cannot read DICOM header ({type(exc).__name__}: {exc})"
    if problem is not None:
      problems.append(Series(relative, "", "", None, "", "", (candidate,), path, folder, problem))
    elif ds is not None:
      groups.setdefault(str(ds.SeriesInstanceUID), []).append((candidate, ds))
  if not groups and not problems:
    raise error(DataError, path, "no DICOM files found")
  return _named(groups, _input_name(path), path, folder) + problems


def _text(value) -> str:
  """A tag's value as text; a multi-valued one ('SE', 'IR') joined by '\\' as DICOM stores it."""
  if isinstance(value, (tuple, MutableSequence)):  # pydicom's MultiValue is a MutableSequence
    return "\\".join(str(v) for v in value)
  return str(value)


def _named(groups: dict[str, list], base: str, root: str, folder: str) -> list[Series]:
  """Series records sorted by (SeriesNumber, UID), with their documented output names."""
  records = []
  for uid, members in groups.items():
    first = members[0][1]
    records.append(
      Series(
        name="",
        series_uid=uid,
        study_uid=str(first.get("StudyInstanceUID", "")),
        number=_number(first),
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        files=tuple(path for path, _ in members),
        root=root,
        folder=folder,
        scanning_sequence=_text(first.get("ScanningSequence", "")),
        sequence_name=str(first.get("SequenceName", "")),
      )
    )
  records.sort(key=lambda s: (s.number is None, s.number or 0, s.series_uid))
  if len(records) == 1:
    return [dataclasses.replace(records[0], name=base)]
  named, taken = [], set()
  for record in records:
    name = stem = f"{base}_{record.number or 0}"
    copy = 1
    while name in taken:
      copy += 1
      name = f"{stem}_{copy}"
    taken.add(name)
    named.append(dataclasses.replace(record, name=name))
  return named


def read_series(series: Series) -> DicomImage:
  """Read one found series onto one grid (`ukd.data.io.dicom.read_files`); a bad series raises
  one DataError line that names it."""
  if series.problem is not None:
    raise error(DataError, series.source, series.problem)
  return read_files(list(series.files), series.source, root=series.folder)


def map_modality(tag: str, trained, table=None, source: str = "DICOM series") -> str:
  """The ukd modality a DICOM Modality tag stands for (`table`, DEFAULT_MODALITY_TABLE when
  None); a tag that maps to none of the `trained` modalities is a one-line error."""
  table = DEFAULT_MODALITY_TABLE if table is None else table
  name = table.get(str(tag).strip())
  if name is None or name not in tuple(trained):
    mapped = f" (mapped to '{name}')" if name is not None else ""
    known = ", ".join(f"{k}->{v}" for k, v in table.items())
    raise error(
      DataError,
      source,
      f"DICOM Modality '{tag}'{mapped} is not a modality the model was trained on "
      f"({', '.join(trained)}); the modality table maps {known}",
    )
  return name


def modality_of(series: Series, trained, table=None, sequences=None) -> str:
  """The ukd modality a series is predicted as: an MR series by its sequence where
  `sequences` ({modality: regex}) is given (`match_sequence`), any other series (and every
  series without `sequences`) by its Modality tag (`map_modality`)."""
  if sequences and str(series.modality).strip() == MR_TAG:
    return match_sequence(series, sequences)
  return map_modality(series.modality, trained, table, source=series.source)


def match_sequence(series: Series, sequences) -> str:
  """The one modality of `sequences` ({modality: regex}) whose regex is found, ignoring case,
  in the series' SeriesDescription, ScanningSequence or SequenceName.  The Modality tag says
  MR for every sequence, so these are what tell T1 from T2; none matching, or several, is a
  one-line error naming the SeriesDescription and the patterns, since a guess would run the
  network with another sequence's normalisation."""
  texts = (series.description, series.scanning_sequence, series.sequence_name)
  found = [
    modality
    for modality, pattern in sequences.items()
    if any(re.search(pattern, text, re.IGNORECASE) for text in texts)
  ]
  if len(found) == 1:
    return found[0]
  patterns = ", ".join(f"{m}: {p!r}" for m, p in sequences.items())
  what = "no pattern" if not found else f"the patterns of {', '.join(found)}"
  raise error(
    DataError,
    series.source,
    f"{what} of config.infer.dicom_sequences ({patterns}) matched its SeriesDescription "
    f"{series.description!r} (ScanningSequence {series.scanning_sequence!r}, SequenceName "
    f"{series.sequence_name!r}); pass --modality to choose",
  )
