"""One direction of imports: the sampling side (`specdiff_train.speculative`) never imports the
drafter-training modules (`specdiff_train.models.drafter`); what both need lives below both."""
import subprocess
import sys

from helpers import ROOT

SCRIPT = """
import sys
import specdiff_train.speculative as spec
from specdiff_train.models.checkpoints import check_drafter_target, load_target

target = load_target("checkpoints/toy2d/target.ckpt")
for drafter in (spec.DraftNetworkDrafter("checkpoints/toy2d/draftnet.ckpt"),
                spec.MedusaDrafter("checkpoints/toy2d/medusa.ckpt")):
    assert check_drafter_target(drafter, target) is None, drafter
    spec.speculative_sample(target, target.schedule, target.sample_shape, num_steps=10, seeds=[0], drafter=drafter,
                            window=3)  # sampling with a learned drafter (its target check included)
print(sorted(m for m in sys.modules if m.startswith("specdiff_train.models")))
"""


def test_speculative_does_not_import_the_drafter_training_modules():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = proc.stdout.strip().splitlines()[-1]
    assert "specdiff_train.models.checkpoints" in loaded  # the loading really went through the shared layer
    assert "specdiff_train.models.drafter" not in loaded, loaded


def test_moved_names_stay_importable_from_their_old_homes():
    from specdiff_train.models import DraftDistillation, HeadDistillation, check_drafter_target, load_drafter
    from specdiff_train.models import checkpoints, drafter
    from specdiff_train.nets.heads import medusa_x0
    from specdiff_train.speculative import learned

    assert drafter.check_drafter_target is check_drafter_target is checkpoints.check_drafter_target
    assert drafter.load_drafter is load_drafter and drafter.load_draft_network is checkpoints.load_draft_network
    assert drafter.target_fingerprint is checkpoints.target_fingerprint
    assert drafter.drafter_target_warning is checkpoints.drafter_target_warning
    assert learned.medusa_x0 is medusa_x0
    assert DraftDistillation is drafter.DraftDistillation and HeadDistillation is drafter.HeadDistillation


NO_DIFFUSERS = """
import sys
import specdiff_train, specdiff_train.cli, specdiff_train.models, specdiff_train.speculative as spec
from specdiff_train.models import load_target
from specdiff_train.models.drafter import frozen_target
from specdiff_train.sampling import ancestral_sample

target = load_target("checkpoints/toy2d/target.ckpt")
frozen_target("checkpoints/toy2d/target.ckpt")
ancestral_sample(target, target.schedule, target.sample_shape, num_steps=5, seeds=[0])
spec.speculative_sample(target, target.schedule, target.sample_shape, num_steps=5, seeds=[0],
                        drafter=spec.MedusaDrafter("checkpoints/toy2d/medusa.ckpt"), window=3)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "accelerate")))
"""


def test_diffusers_is_imported_only_for_diffusers_targets():
    """diffusers is an optional extra: the package, the CLI and sampling our own targets never import it."""
    proc = subprocess.run([sys.executable, "-c", NO_DIFFUSERS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
