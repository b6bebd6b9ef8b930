"""python -m ukd.data.synthetic: phantom datasets written in the real datasets' layouts."""

import argparse

from ukd.data.synthetic import generate
from ukd.data.synthetic.phantoms import DEFAULT_SHAPE
from ukd.errors import DataError


def main(argv=None) -> None:
  """python -m ukd.data.synthetic --layout=mmwhs --out=DIR --n_ct=4 --n_mr=4"""
  parser = argparse.ArgumentParser(description=generate.__doc__.split("\n", 1)[0])
  parser.add_argument("--layout", choices=sorted(generate.WRITERS), required=True)
  parser.add_argument("--out", required=True, help="dataset root to write")
  parser.add_argument("--n_ct", type=int, default=4)
  parser.add_argument("--n_mr", type=int, default=4)
  parser.add_argument(
    "--shape",
    default=",".join(map(str, DEFAULT_SHAPE)),
    help="array shape, comma separated; the last axis is the slice axis",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--t1dual", action="store_true", help="abdominal: CHAOS T1-DUAL phases beside T2-SPIR"
  )
  parser.add_argument(
    "--realism",
    choices=generate.REALISMS,
    default="simple",
    help="phantom set (scanner: mmwhs and folder only)",
  )
  parser.add_argument(
    "--modalities",
    default=None,
    help="folder: modality=contrast pairs, a folder each (default ct=ct,mr=mr), e.g. "
    "ct=ct,mr=mr,t2=mr_t2 (mr_t2: the scanner set's T2-weighted MR)",
  )
  args = parser.parse_args(argv)
  try:
    shape = tuple(int(n) for n in args.shape.split(","))
  except ValueError:
    parser.error(f"--shape must be comma-separated integers, got {args.shape!r}")
  options = {"t1dual": True} if args.t1dual else {}
  if options and args.layout != "abdominal":
    parser.error("--t1dual is for --layout=abdominal (CHAOS)")
  if args.modalities is not None and args.layout != "folder":
    parser.error("--modalities is for --layout=folder")
  if args.layout == "folder":
    given = args.modalities or "ct=ct,mr=mr"
    pairs = [item.partition("=") for item in given.split(",")]
    if not all(name and sep and contrast for name, sep, contrast in pairs):
      parser.error(f"--modalities must be modality=contrast pairs, got {given!r}")
    options = {
      "folders": {name: name for name, _, _ in pairs},
      "contrasts": {name: contrast for name, _, contrast in pairs},
    }
  try:
    written = generate.WRITERS[args.layout](
      args.out, args.n_ct, args.n_mr, shape=shape, seed=args.seed, realism=args.realism, **options
    )
  except DataError as error:
    parser.error(str(error))
  print(f"wrote {len(written)} files under {args.out}")


if __name__ == "__main__":
  main()
