"""The overrides that shrink a config's run to seconds: 18 train images of 3 classes at 64 pixels, random init.

The tests of tests/unit and tests/e2e import it as ``tiny``: pytest puts tests/ (the folder of
tests/conftest.py) on ``sys.path``, as it puts each test's own folder there.
"""

TINY = [
    "data.synthetic.num_classes=3",
    "data.synthetic.train_per_class=6",
    "data.synthetic.val_per_class=3",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.num_workers=2",
    "model.weights=null",
    "data.crop_size=64",  # resize 73 (the weights' 256/224 ratio): the pipeline at a 12th of the pixels
]
