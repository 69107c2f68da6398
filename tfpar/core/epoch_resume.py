"""The mid-epoch cut: a run restored from a mid-epoch backup ends that epoch after the steps it still owed.

Keras ``fit`` restarts a resumed epoch at batch 0 and would run all of its
steps again, so a backup taken 1 step into a 3-step epoch would make that
epoch 4 steps long. Both backup callbacks (tfpar's ``BackupAndRestore`` and
Keras's, as patched by ``tfpar.kerasfix.saving``) keep one ``EpochResume``
and call it from their epoch and batch hooks; it counts the steps done in
the current epoch, including those before the backup, and stops that epoch
(``model.stop_training``) once it has its usual length.
"""

import dataclasses


def normalized(epoch, done, steps_per_epoch):
    """(epoch, steps done in it), with an epoch's last step counted as the next epoch's start:
    a resumed epoch that owed zero steps would otherwise train one too many."""
    if steps_per_epoch and done >= steps_per_epoch:
        return epoch + 1, 0
    return epoch, done


@dataclasses.dataclass
class EpochResume:
    """Where training stands in the current epoch, and where a restored backup left its epoch."""

    resumed_epoch: object = None  # the epoch a mid-epoch backup was taken in (None: none was)
    done_before: int = 0  # that epoch's steps done before the backup
    epoch: int = 0  # the epoch in progress
    done: int = 0  # its steps done, those before the backup included
    cut: bool = False  # we set stop_training to end the resumed epoch

    def steps_before(self, epoch):
        """Steps of ``epoch`` done before the backup (0 unless it is the resumed epoch)."""
        return self.done_before if epoch == self.resumed_epoch else 0

    def epoch_begin(self, epoch):
        self.epoch, self.done, self.cut = epoch, self.steps_before(epoch), False

    def batch_end(self, batch, model, steps_per_epoch):
        """After Keras batch index ``batch`` of the current epoch: count it, and end a resumed epoch in time."""
        before = self.steps_before(self.epoch)
        self.done = before + batch + 1
        if before and steps_per_epoch and self.done >= steps_per_epoch and not model.stop_training:
            model.stop_training = True  # ends the resumed epoch at its usual length
            self.cut = True

    def epoch_end(self, model):
        if self.cut:
            model.stop_training = False  # we only ended the epoch, not the training
            self.cut = False
        self.done = 0

    def position(self, steps_per_epoch):
        """(epochs done, steps done in the current epoch) now, as a backup records it."""
        return normalized(self.epoch, self.done, steps_per_epoch)
