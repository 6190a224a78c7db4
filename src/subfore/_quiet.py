"""The known noise, filtered by name: MONAI's and Lightning's notices that say nothing about the user's run.

Applied by the CLI in its own process (``subfore.cli.main``) and imported first in worker processes (before MONAI):
a spawned or forkserver worker starts without the parent's filters. Every other warning reaches the user.
"""

import logging
import warnings

# (message regex, category): each is printed on every run whatever the user does.
KNOWN = [
    (r"NvImgCodecPydicomReader", UserWarning),  # MONAI at import: an optional GPU DICOM decoder is not installed
    (r".*always_return_as_numpy", FutureWarning),  # MONAI's surface metrics call their own deprecated argument
    (r".*isinstance\(treespec, LeafSpec\)", Warning),  # Lightning's loop on torch's renamed pytree class
    (r"torch.distributed.nn.functional.all_gather is deprecated", Warning),  # inside Lightning's all_gather
    # val/loss and val/dice are summed across ranks by the modules themselves (engine.reduce_sum) before logging.
    (r"It is recommended to use `self.log\('val/(loss|dice|cases)'", Warning),
    # The EMA teacher (AnatoMask, hard-patch mining) is a frozen copy kept in eval mode on purpose.
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning),
    # A run without validation data (data.val unset) skips the modules' validation_step on purpose.
    (r"You defined a `validation_step` but have no `val_dataloader`", Warning),
]


def apply() -> None:
    """Install the filters for :data:`KNOWN` and quiet MONAI's and pydicom's import-time log lines."""
    for message, category in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("monai", "pydicom"):
        logging.getLogger(name).setLevel(logging.ERROR)


apply()
