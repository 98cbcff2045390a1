"""Alarms during training: signs that a run is wasting its steps, each raised once, at the step it was seen, with
what to try. Rank 0 feeds `Alarms.see` each step's record; what it returns goes to the job's events (a warning the
server copies into its store, the dashboard and `runner status` show) and to its log.

- the learning rate at zero after warm-up while steps remain: those steps change nothing (a schedule that ends
  early, as Accelerate's per-process scheduler stepping once made every multi-worker job's do);
- the training loss not falling over the first epoch after warm-up: no significant downward trend by the
  Mann-Kendall test (z < -2; batch losses are noisy, so a first-against-last comparison sees falls in noise, and
  a least-squares slope follows one unlucky batch): the model is not learning from the data as given;
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
LOSS_Z = -2.0  # ...and its loss is falling when the Mann-Kendall statistic is below this
TREND_POINTS = 200  # a longer epoch is judged on the means of this many equal runs of steps
GRAD_SPIKE = 1000.0  # one step's gradient norm this many times the usual (the median of the steps before)...
GRAD_RECENT, GRAD_SUSTAINED = 5, 20.0  # ...or the median of the last 5 steps 20 times the usual
GRAD_HISTORY = 10  # judged once this many steps came before (the usual: the median of the last GRAD_WINDOW)
GRAD_WINDOW = 200


class Alarms:
    def __init__(self, total_steps: int, steps_per_epoch: int, warmup_steps: int, lr: float, raised=()):
        """raised: the kinds raised before (a resumed run's checkpoint has them): not raised again."""
        self.total, self.per_epoch, self.warmup, self.peak = total_steps, steps_per_epoch, warmup_steps, lr
        self.raised: set[str] = set(raised)
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
        """Judged over the first epoch after warm-up (a warm-up's small lr explains a flat start)."""
        start = self.warmup + 1
        end = min(self.warmup + self.per_epoch, self.total)
        if not start <= rec["step"] <= end or end - start + 1 < LOSS_MIN_STEPS:
            return None
        if math.isfinite(rec["loss"]):
            self.epoch_losses.append((rec["step"], rec["loss"]))
        if rec["step"] < end or len(self.epoch_losses) < LOSS_MIN_STEPS:
            return None
        z = falling_z([y for _, y in self.epoch_losses])
        if z < LOSS_Z:
            return None
        losses = [y for _, y in self.epoch_losses]
        k = max(2, len(losses) // 4)
        what = "first epoch" if end - start + 1 == self.per_epoch else f"first {end - start + 1} steps"
        after = " after warm-up" if self.warmup else ""
        return (f"the training loss did not fall over the {what}{after} (steps {start}-{end}: no downward trend, "
                f"z = {z:.1f}; mean {statistics.fmean(losses[:k]):.4g} over its first {k} steps, "
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


def falling_z(ys: list[float]) -> float:
    """The Mann-Kendall statistic of a sequence: about N(0, 1) for noise around a level, well below 0 for a fall.
    A sequence longer than TREND_POINTS is judged on the means of TREND_POINTS equal runs (the test is quadratic)."""
    if len(ys) > TREND_POINTS:
        edges = [round(i * len(ys) / TREND_POINTS) for i in range(TREND_POINTS + 1)]
        ys = [statistics.fmean(ys[a:b]) for a, b in zip(edges, edges[1:])]
    n = len(ys)
    s = sum((ys[j] > ys[i]) - (ys[j] < ys[i]) for i in range(n) for j in range(i + 1, n))
    sd = math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    return (s - 1) / sd if s > 0 else (s + 1) / sd if s < 0 else 0.0
