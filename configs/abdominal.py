r"""The paper's abdominal setting: BTCV CT + CHAOS T2-SPIR MR, the 3D U-Net, scheme ukd.

  python -m ukd.main --config=configs/abdominal.py --workdir=runs/abdominal \
      --config.data.root=/data/abdominal     # holds BTCV/ and CHAOS/

Variants: `configs/abdominal.py:scheme=joint` (any scheme); `:runlocal` for a quick check;
`:all_ct_organs` trains BTCV's 13 CT organs rather than the 4 both datasets label.  CHAOS MR
labels liver, right kidney, left kidney and spleen; for MR the other 9 (gallbladder,
esophagus, stomach, aorta, inferior vena cava, portal and splenic vein, pancreas, right and
left adrenal gland) are learnt from CT alone, through the shared kernels and KD.  MR's loss
merges them with background (`ukd.train.losses`), so it never calls them background, KD
aligns the 4 organs both label, and MR is scored on its 4 (the others listed as not scored).

`:sequences` trains three modalities, CT and two CHAOS MR sequences, T1-DUAL in-phase
(`t1in`) and T2-SPIR (`t2`), each with its own normalisation; KD averages over the three
pairs.  DICOM prediction tells the MR sequences apart by `infer.dicom_sequences` (the Modality
tag says MR for both):

  python -m ukd.main --config=configs/abdominal.py:sequences --workdir=runs/abdominal_seq \
      --config.data.root=/data/abdominal

Pixel size: `data.spacing='1.6'` resamples every axial slice in-plane to 1.6 x 1.6 mm (and
predictions back), one scale for CT and MR.  BTCV CT has 512 x 512 slices of about 0.6-0.98
mm, 2.5-5 mm apart; CHAOS T2-SPIR MR has 256 x 256 slices of 1.36-1.89 mm (1.61 mm on
average), 5.5-9 mm apart (Kavur et al., MedIA 2021).  1.6 mm is MR's average, so MR changes by
at most about 18%, and CT is taken down 1.6-2.7x, about what resizing its 512 pixels to 256
did.  256 pixels of 1.6 mm span 410 mm, a whole abdominal cross-section in one patch; a wider
patient is covered by sliding windows.  The slice spacing is left as scanned.  `runlocal`
keeps that field of view with 64 pixels of 6.4 mm.

The recipe is the reference code's (Dou et al.'s released 3D TensorFlow code): absent classes
get a uniform KD distribution (`loss.kd_absent='uniform'`, as in 2D); the 1x1x1 head has a
bias (`model.head_bias=True`); transposed convolutions start from an uncut normal of std 0.01
(`model.init='reference'`).  L2 weight: the reference adds 1e-4 * sum over every trainable
variable v of tf.nn.l2_loss(v) = 1e-4 * 1/2 sum v^2 to EACH modality's loss and minimises the
sum of the two, so every variable is penalised by 2 * 1e-4 * 1/2 sum v^2.  ukd adds
`loss.l2` * 1/2 sum v^2 once per step, so the same penalty is `loss.l2 = 2e-4` with
`loss.l2_scope='all'`.  (The l2_regularizer of 5e-4 on the reference's transposed-convolution
filters registers a loss that its training objective never reads, so it adds nothing.)
"""

from ukd import config as config_lib


def get_config(arg=None):
  c = config_lib.default()
  args = config_lib.parse_arg(
    arg, scheme="ukd", runlocal=False, all_ct_organs=False, sequences=False
  )
  c.data.dataset = "abdominal"
  c.modalities = ("ct", "mr")
  c.model.name = "unet3d"
  c.model.scheme = args["scheme"]
  c.model.num_classes = 5  # background, liver, right kidney, left kidney, spleen
  if args["all_ct_organs"]:
    c.data.options.organs = "all_ct"  # BTCV's 13, of which CHAOS MR labels 4 (the docstring)
    c.model.num_classes = 14
  if args["sequences"]:
    c.modalities = ("ct", "t1in", "t2")
    c.data.options.mr_sequences = {"t1in": "T1DUAL/InPhase", "t2": "T2SPIR"}
    for sequence in ("t1in", "t2"):  # as MR's: z-scores clipped at percentiles 0.5 and 99.5
      c.data.norm[sequence] = c.data.norm.mr.to_dict()
    # SeriesDescription, ScanningSequence or SequenceName, ignoring case: 'T1 in-phase',
    # 'T1DUAL InPhase', 'T2 SPIR'...; any other MR series is refused in one line.
    c.infer.dicom_sequences = {"t1in": r"in[ _-]?phase", "t2": r"t2"}
  c.model.width = 16
  c.data.size = (256, 256)
  c.data.patch = (256, 256, 8)
  c.data.spacing = "1.6"  # mm in-plane, CT and MR alike (see the docstring)
  c.data.fg_fraction = 0.5
  c.model.head_bias = True
  c.loss.l2_scope = "all"  # the reference 3D code penalises every trainable variable ...
  c.loss.l2 = 2e-4  # ... in both modalities' losses: twice 1e-4 (see the docstring)
  c.loss.kd_absent = "uniform"
  c.batch_size = 2  # per modality
  c.optim.lr = 1e-4
  c.optim.decay_rate = 0.95
  c.optim.decay_steps = 500
  c.total_steps = 50_000
  c.eval_every = c.checkpoint_every = 1000
  if args["runlocal"]:
    c.model.width = 4
    c.data.size = (64, 64)
    c.data.patch = (64, 64, 8)
    c.data.spacing = "6.4"
    c.total_steps = 100
    c.eval_every = c.checkpoint_every = 50
    c.log_every = 10
  return c
