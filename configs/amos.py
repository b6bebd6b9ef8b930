r"""AMOS22: abdominal CT and MR from one folder, 15 organs, the 3D U-Net, scheme ukd.

  python -m ukd.main --config=configs/amos.py --workdir=runs/amos \
      --config.data.root=/data/amos22     # holds dataset.json, imagesTr/, labelsTr/, ...

Variants: `configs/amos.py:scheme=joint` (any scheme); `:runlocal` for a quick check;
`:phantoms` trains on abdominal phantoms written in AMOS22's layout into <workdir>/phantoms
(no data needed; with `runlocal` it takes minutes on a CPU):

  python -m ukd.main --config=configs/amos.py:runlocal,phantoms --workdir=/tmp/ukd_amos

Modality by case number, as the AMOS22 readme says: ids below 500 are CT (amos_0001..0499),
500 and up MR (the released MR cases are amos_0507..0600).  Classes are AMOS's label codes:
1 spleen, 2 right kidney, 3 left kidney, 4 gall bladder, 5 esophagus, 6 liver, 7 stomach,
8 aorta, 9 postcava (IVC), 10 pancreas, 11 right adrenal gland, 12 left adrenal gland,
13 duodenum, 14 bladder, 15 prostate/uterus; predictions are written with the same codes.
The phantoms draw 8 of them (1-4, 6-9); the others never occur there.

Everything else is the abdominal setting's (`configs/abdominal.py`: the reference 3D recipe,
1.6 mm pixels).  Mirroring is off, as in the paper; `--config.data.augment.flip='(0, 1)'`
turns it on, and a flip along the patient's left-right then swaps the kidneys' and adrenal
glands' labels (and, with `--tta`, their probabilities), so left stays left.
"""

from ukd import config as config_lib
from ukd.configs import abdominal


def get_config(arg=None):
  args = config_lib.parse_arg(arg, scheme="ukd", runlocal=False, phantoms=False)
  c = abdominal.get_config(f"scheme={args['scheme']},runlocal={args['runlocal']}")
  c.data.dataset = "amos"
  c.model.num_classes = 16  # background and AMOS's 15 organs
  if args["phantoms"]:
    c.data.root = ""  # '' = <workdir>/phantoms
    c.data.synthetic.enabled = True
    c.data.synthetic.n_ct = c.data.synthetic.n_mr = 6
    c.data.synthetic.shape = (64, 64, 24)
  return c
