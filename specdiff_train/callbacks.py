"""`RunCheckpoint`: Lightning's `ModelCheckpoint` that never lets training work go unsaved.

The CLI adds it as `checkpoint` (options `--checkpoint.*`, every run writes `last.ckpt`):
- Ctrl-C (SIGINT) stops after the training step in progress and writes `last.ckpt` at that step, in
  the same form as a checkpoint written at a step's end, so `fit --ckpt_path .../last.ckpt` resumes
  exactly there. A second Ctrl-C stops at once; Lightning's exception path then saves
  (`save_on_exception`), as it does for any exception.
- When training ends at `max_steps` between two validations, `last.ckpt` is written at that final
  step (Lightning's `ModelCheckpoint` keeps the last validation's).
- A run resumed from its own `last.ckpt` keeps writing that file, also when the run's folder was moved or
  copied since (the checkpoint records the old folder, and Lightning's `ModelCheckpoint` then took the
  file for another run's and wrote `last-v1.ckpt` beside it).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Literal

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` (same arguments) with `save_last` and `save_on_exception` on by default, a
    graceful Ctrl-C (stop after the current step, save `last.ckpt` there) and a `last.ckpt` at the
    final step of every run."""

    SYNC_EVERY = 16  # under DDP, steps between two checks of a Ctrl-C (a collective call)

    def __init__(self, *args: Any, save_last: bool | Literal["link"] | None = True, save_on_exception: bool = True,
                 **kwargs: Any):
        super().__init__(*args, save_last=save_last, save_on_exception=save_on_exception, **kwargs)
        self._stop_requested = False
        self._previous_handler: Any = None

    # --- Ctrl-C ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._stop_requested = False
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        # After the callback's state is restored: resuming from this folder's last.ckpt, that file is ours.
        last = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        if trainer.ckpt_path and self.dirpath and os.path.abspath(trainer.ckpt_path) == os.path.abspath(last):
            self.last_model_path = last

    def _on_sigint(self, signum, frame) -> None:
        if self._stop_requested:  # the second Ctrl-C: stop now
            self._restore_handler()
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\nCtrl-C: stopping after this training step and saving last.ckpt (press Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Decided on all ranks together, so under DDP every process stops after the same step; there the
        # decision (a collective) is taken every SYNC_EVERY steps only.
        if trainer.world_size > 1:
            if trainer.global_step % self.SYNC_EVERY or not trainer.strategy.reduce_boolean_decision(
                    self._stop_requested, all=False):
                return
        elif not self._stop_requested:
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(f"Interrupted at step {trainer.global_step}: saved {self.last_model_path}. Resume with "
                       f"`python train.py fit --config ... --ckpt_path {self.last_model_path}`.")
        self._restore_handler()
        raise KeyboardInterrupt  # Lightning's interrupt path: teardown, exit status 1

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore_handler()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handler()
        super().teardown(trainer, pl_module, stage)

    # --- the final step --------------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if (self.save_last and trainer.state.fn == TrainerFn.FITTING and not trainer.fast_dev_run
                and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
