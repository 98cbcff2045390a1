"""Alarms during training: signs that a run is wasting its steps, each raised once, at the step it was seen, with
what to try. Rank 0 feeds `Alarms.see` each step's record; what it returns goes to the job's events (a warning the
server copies into its store, the dashboard and `runner status` show) and to its log.

- the learning rate at zero after warm-up while steps remain: those steps change nothing (a schedule that ends
  early, as Accelerate's per-process scheduler stepping once made every multi-worker job's do);
- the training loss not falling over the first epoch: the slope of loss against step over the epoch is not
  significantly below zero (t < -2; batch losses are noisy, so a plain first-against-last comparison would see a
  fall in noise): the model is not learning from the data as given;
- the gradient norm exploding: not finite, a single step 1000 times its usual size, or the median of the last
  five steps 20 times the median before them (single spikes of 10-100x come and go in healthy small-batch runs,
  and clipping bounds their update; a norm that stays up is what explodes).

Plain arithmetic over the records, no torch: the thresholds are named here and tested in tests/unit/test_alarms.py.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

LR_ZERO_FRACTION = 0.03  # lr at 0 for more than this fraction of the run (and at least 2 steps) while steps remain
LOSS_MIN_STEPS = 8  # the first epoch is judged when it has at least this many steps...
LOSS_T = -2.0  # ...and its loss is falling when the slope's t statistic is below this
GRAD_SPIKE = 1000.0  # one step's gradient norm this many times the usual (the median of the steps before)...
GRAD_RECENT, GRAD_SUSTAINED = 5, 20.0  # ...or the median of the last 5 steps 20 times the usual
GRAD_HISTORY = 10  # judged once this many steps came before (the usual: the median of the last GRAD_WINDOW)
GRAD_WINDOW = 200


class Alarms:
    def __init__(self, total_steps: int, steps_per_epoch: int, warmup_steps: int, lr: float):
        self.total, self.per_epoch, self.warmup, self.peak = total_steps, steps_per_epoch, warmup_steps, lr
        self.raised: set[str] = set()
        self.zero_since: int | None = None
        self.epoch_losses: list[float] = []
        self.norms: deque[float] = deque(maxlen=GRAD_WINDOW)

    def see(self, rec: dict) -> list[dict]:
        """rec: step (1-based), loss, lr (the lr this step's update used), grad_norm (before clipping; may be
        absent). Returns the alarms raised at this step: {"kind", "step", "message"}."""
        out = []
        for kind, check in (("lr_zero", self._lr_zero), ("loss_flat", self._loss_flat),
                            ("grad_norm", self._grad_norm)):
            if kind in self.raised:
                continue
            message = check(rec)
            if message:
                self.raised.add(kind)
                out.append({"kind": kind, "step": rec["step"], "message": message})
        return out

    def _lr_zero(self, rec: dict) -> str | None:
        step, lr = rec["step"], rec.get("lr")
        if lr is None or step <= self.warmup + 1 or lr > 0:  # warm-up starts at 0 by design
            self.zero_since = None
            return None
        self.zero_since = self.zero_since or step
        zero = step - self.zero_since + 1
        left = self.total - step
        if left > 0 and zero >= max(2, math.ceil(LR_ZERO_FRACTION * self.total)):
            return (f"the learning rate has been 0 since step {self.zero_since} with {left} of {self.total} steps "
                    f"left: those steps change nothing. The schedule should reach 0 only at the end: check "
                    f"train.schedule, train.warmup_steps/warmup_ratio and train.max_steps against the run's "
                    f"{self.total} steps")
        return None

    def _loss_flat(self, rec: dict) -> str | None:
        n = min(self.per_epoch, self.total)
        if rec["step"] > n or n < LOSS_MIN_STEPS:
            return None
        if math.isfinite(rec["loss"]):
            self.epoch_losses.append((rec["step"], rec["loss"]))
        if rec["step"] < n or len(self.epoch_losses) < LOSS_MIN_STEPS:
            return None
        slope, t = _trend(self.epoch_losses)
        if t < LOSS_T:
            return None
        losses = [y for _, y in self.epoch_losses]
        k = max(2, len(losses) // 4)
        what = "first epoch" if n == self.per_epoch else f"first {n} steps"
        return (f"the training loss did not fall over the {what} (step {rec['step']}: a trend of {slope:+.3g} a "
                f"step, t = {t:.1f}; mean {statistics.fmean(losses[:k]):.4g} over its first {k} steps, "
                f"{statistics.fmean(losses[-k:]):.4g} over its last {k}): the model is not learning. Try a larger "
                f"train.lr (now {self.peak:g}), check that data.columns maps the text and the label the model should "
                f"learn from, or a tuning mode that trains more of the model")

    def _grad_norm(self, rec: dict) -> str | None:
        norm = rec.get("grad_norm")
        if norm is None or rec.get("skipped"):  # fp16's loss scaler skipped the step: an inf norm is its business
            return None
        if not math.isfinite(norm):
            return (f"the gradient norm is {norm} at step {rec['step']}: the next update will ruin the weights. "
                    f"Lower train.lr (now {self.peak:g}), keep train.max_grad_norm set, or add warm-up "
                    f"(train.warmup_ratio)")
        self.norms.append(norm)
        if len(self.norms) < GRAD_HISTORY + GRAD_RECENT:
            return None
        history = list(self.norms)
        usual = statistics.median(history[:-GRAD_RECENT])
        recent = statistics.median(history[-GRAD_RECENT:])
        if usual <= 0 or (norm < GRAD_SPIKE * usual and recent < GRAD_SUSTAINED * usual):
            return None
        how = (f"{norm:.4g}, {norm / usual:.0f} times its usual {usual:.4g}" if norm >= GRAD_SPIKE * usual else
               f"a median of {recent:.4g} over the last {GRAD_RECENT} steps, {recent / usual:.0f} times its usual "
               f"{usual:.4g}")
        return (f"the gradient norm exploded at step {rec['step']}: {how}. Lower train.lr (now {self.peak:g}), set "
                f"train.max_grad_norm (clipping), or add warm-up (train.warmup_ratio)")


def _trend(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares slope of y on x and its t statistic (slope / standard error); -inf for a perfect fall."""
    n = len(points)
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in points) / (n - 2)
    se = math.sqrt(resid / sxx)
    if se == 0:
        return slope, -math.inf if slope < 0 else math.inf if slope > 0 else 0.0
    return slope, slope / se
