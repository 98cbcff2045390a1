"""The training alarms on record sequences: the one the quickstart wrote before its schedule was fixed, and runs
that are healthy, flat or exploding. The thresholds are the module's; each case is worked out by hand here."""

from jobs.alarms import Alarms


def run(alarms: Alarms, records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        out += alarms.see(r)
    return out


def linear(step: int, total: int, warmup: int, peak: float) -> float:
    """The lr the update of 1-based `step` uses: transformers' linear schedule after step - 1 updates."""
    k = step - 1
    return peak * k / warmup if k < warmup else peak * max(0.0, (total - k) / (total - warmup))


def test_the_quickstart_schedule_that_ended_halfway_is_an_alarm():
    # 2 workers, 30 steps, 3 of warm-up: Accelerate stepped the schedule twice a step, so the update of step s used
    # the lr of 2(s-1) updates, 0 from step 16 on (metrics.jsonl of the report: lr 0.0 at step 15 of 30 and after)
    total, warmup, peak = 30, 3, 1e-3
    records = [{"step": s, "loss": 1.3, "lr": linear(2 * (s - 1) + 1, total, warmup, peak)} for s in range(1, 31)]
    assert records[15]["lr"] == 0 and records[14]["lr"] > 0
    got = run(Alarms(total, 15, warmup, peak), records)
    zero = [a for a in got if a["kind"] == "lr_zero"]
    assert len(zero) == 1 and zero[0]["step"] == 17, zero
    assert "0 since step 16 with 13 of 30 steps left" in zero[0]["message"]


def test_a_healthy_run_raises_nothing():
    total, warmup, peak = 60, 6, 1e-3
    records = [{"step": s, "loss": 1.4 * 0.97 ** s, "lr": linear(s, total, warmup, peak),
                "grad_norm": 2.0 + (s % 3) * 0.1} for s in range(1, total + 1)]
    assert records[0]["lr"] == 0  # the warm-up's first update, by transformers' schedule
    assert run(Alarms(total, 20, warmup, peak), records) == []


def test_a_flat_loss_over_the_first_epoch_is_an_alarm_at_its_end():
    records = [{"step": s, "loss": 1.386 + (0.01 if s % 2 else -0.01), "lr": 1e-9} for s in range(1, 41)]
    got = run(Alarms(40, 20, 0, 1e-9), records)
    assert [(a["kind"], a["step"]) for a in got] == [("loss_flat", 20)]
    assert "did not fall over the first epoch" in got[0]["message"] and "train.lr (now 1e-09)" in got[0]["message"]


def test_a_short_first_epoch_is_not_judged():
    records = [{"step": s, "loss": 1.0, "lr": 1e-3} for s in range(1, 8)]
    assert run(Alarms(7, 7, 0, 1e-3), records) == []


def test_an_exploding_gradient_norm_is_an_alarm_once():
    records = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "grad_norm": 1.0 + 0.01 * s} for s in range(1, 16)]
    records += [{"step": 15 + i, "loss": 0.5, "lr": 1e-3, "grad_norm": 30.0 * i} for i in range(1, 6)]
    got = run(Alarms(100, 1000, 0, 1e-3), records)
    # at step 18 the last five norms are 1.14, 1.15, 30, 60, 90: median 30, 28 times the usual 1.07 (steps 1-13)
    assert [(a["kind"], a["step"]) for a in got] == [("grad_norm", 18)]
    assert "exploded at step 18: a median of 30 over the last 5 steps, 28 times its usual 1.07" in got[0]["message"]


def test_spikes_of_a_healthy_small_batch_run_are_not_an_alarm():
    # gradient norms of a 2-class tiny-BERT run that learned (test accuracy 1.0), clipped at 1: spikes of 10-100x
    norms = [0.3, 0.28, 0.32, 0.25, 0.75, 0.46, 0.52, 0.3, 0.31, 0.42, 0.7, 0.63, 0.48, 0.51, 0.73, 0.85, 0.85, 0.4,
             0.41, 1.08, 0.6, 0.45, 0.65, 0.45, 0.82, 1.19, 1.32, 0.84, 2.27, 1.32, 0.73, 1.95, 2.83, 2.69, 2.0, 5.7,
             2.48, 8.56, 0.72, 3.51, 11.66, 4.49, 0.39, 0.35, 0.3, 0.26, 0.28, 0.19, 0.17, 0.13, 0.14, 0.11, 0.11, 0.09,
             47.14, 0.07, 0.06, 0.06, 0.05, 0.05]
    records = [{"step": i + 1, "loss": 0.7 / (i + 1), "lr": 3e-3, "grad_norm": g} for i, g in enumerate(norms)]
    assert run(Alarms(144, 24, 0, 3e-3), records) == []


def test_a_gradient_norm_that_is_not_finite_is_an_alarm_at_once():
    got = run(Alarms(100, 1000, 0, 1e-3), [{"step": 1, "loss": 3.0, "lr": 1e-3, "grad_norm": float("inf")}])
    assert got[0]["kind"] == "grad_norm" and "is inf at step 1" in got[0]["message"]


def test_a_step_the_fp16_loss_scaler_skipped_is_not_an_alarm():
    rec = {"step": 1, "loss": 3.0, "lr": 1e-3, "grad_norm": float("inf"), "skipped": True}
    assert run(Alarms(100, 1000, 0, 1e-3), [rec]) == []


def test_a_flat_loss_is_judged_after_warm_up():
    """Warm-up over steps 1-10 keeps the loss flat by design: the epoch judged is steps 11-30, where it falls."""
    records = [{"step": s, "loss": 1.386 if s <= 10 else 1.386 - 0.02 * (s - 10), "lr": 1e-3} for s in range(1, 41)]
    assert run(Alarms(40, 20, 10, 1e-3), records) == []
    flat = [{**r, "loss": 1.386} for r in records]
    got = run(Alarms(40, 20, 10, 1e-3), flat)
    assert [(a["kind"], a["step"]) for a in got] == [("loss_flat", 30)]
    assert "over the first epoch after warm-up (steps 11-30" in got[0]["message"]


def test_the_trend_test_on_real_first_epochs():
    """Batch losses of first epochs seen here: two of a model that could not learn (lr 1e-9; one opens with an
    unlucky batch that a least-squares slope took for a fall), one that learned slowly, the quickstart's."""
    from jobs.alarms import LOSS_Z, falling_z

    stuck = [[9.95, 5.11, 7.47, 7.75, 4.61, 7.73, 5.1, 6.35, 8.97, 2.86, 7.47, 3.36, 4.12, 6.11, 3.61, 4.85, 4.22, 4.99,
              4.98, 5.2],
             [4.105, 6.49, 5.603, 5.494, 5.112, 0.366, 5.971, 7.353, 9.585, 8.066, 4.736, 8.857, 1.729, 8.461, 6.961,
              1.738, 2.851, 2.863, 7.458, 7.363]]
    slow = [0.696, 0.685, 0.679, 0.697, 0.747, 0.716, 0.662, 0.674, 0.679, 0.707, 0.724, 0.701, 0.693, 0.681, 0.653,
            0.731, 0.733, 0.68, 0.67, 0.633, 0.639, 0.669, 0.64, 0.652]
    quickstart = [1.383, 1.383, 1.379, 1.376, 1.374, 1.376, 1.365, 1.352, 1.35, 1.342, 1.329, 1.317, 1.308, 1.299]
    assert all(falling_z(ys) > LOSS_Z for ys in stuck)
    assert falling_z(slow) < LOSS_Z and falling_z(quickstart) < LOSS_Z
    long = [1.0 - 1e-5 * i + (0.3 if i % 7 == 0 else 0.0) for i in range(5000)]  # judged on 200 means, at once
    assert falling_z(long) < LOSS_Z
