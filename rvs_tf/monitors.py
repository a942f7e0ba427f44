"""Training monitors: callbacks that watch the validation signals for known failures of robust training.

Catastrophic overfitting (Wong et al. 2020) is the failure of single-step adversarial training: within an
epoch the classifier learns to defeat the one-step attack it trains on, its loss surface bends so that a
single signed step no longer finds an adversarial example, and accuracy under a multi-step attack falls
towards 0 while accuracy under FGSM stays high or rises. The signature is a large gap between validation
FGSM and PGD accuracy, which `RobustModel.test_step` reports every epoch.
"""
import keras
from absl import logging


class CatastrophicOverfittingMonitor(keras.callbacks.Callback):
    """Warns, each epoch, when validation FGSM accuracy exceeds validation PGD accuracy by more than
    `max_gap`, and logs the gap (`val_fgsm_pgd_gap`) and a 0/1 flag (`catastrophic_overfitting`) into the
    epoch's logs, so the TensorBoard callback placed after it writes them.

    Args:
      max_gap: the largest FGSM - PGD accuracy gap (a fraction) considered healthy. Robust models show a
        few points; a collapsed one tens of points.
      stop: also stop training at the first collapse (keeps the checkpoints written so far).
    """

    def __init__(self, max_gap=0.3, stop=False):
        super().__init__()
        if not 0.0 < float(max_gap) <= 1.0:
            raise ValueError(f"max_gap: expected 0 < max_gap <= 1, got {max_gap}")
        self.max_gap = float(max_gap)
        self.stop = bool(stop)
        self.collapsed_epochs = []

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or "val_fgsm_accuracy" not in logs or "val_pgd_accuracy" not in logs:
            return
        fgsm, pgd = float(logs["val_fgsm_accuracy"]), float(logs["val_pgd_accuracy"])
        gap = fgsm - pgd
        collapsed = gap > self.max_gap
        logs["val_fgsm_pgd_gap"] = gap
        logs["catastrophic_overfitting"] = float(collapsed)
        if collapsed:
            self.collapsed_epochs.append(epoch + 1)
            logging.warning(
                "Epoch %d: catastrophic overfitting: validation FGSM accuracy %.3f against PGD accuracy "
                "%.3f (gap %.3f > %.2f). Single-step training has learned to defeat its own attack; use "
                "the checkpoint of an earlier epoch, a method built against it (--method=nfgsm, fgsm_pgi, "
                "rvs_init), a smaller step, or --method=pgd.", epoch + 1, fgsm, pgd, gap, self.max_gap)
            if self.stop:
                self.model.stop_training = True
