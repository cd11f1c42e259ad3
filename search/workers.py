"""Several processes on one stored study: distinct trials, exactly ``n_trials`` of them.

A trial counts toward ``n_trials`` when it measured its plan: completed, or stopped by the
pruner part way (``measured``), so pruning makes a search cheaper, not longer.

- ``worker_number``: every process that opens a stored study draws the next number of a
  counter kept in the storage (one trial per process in the companion study
  ``"<study>:workers"``; trial numbers are atomic). The first process is worker 0, a second
  machine or a restart is 1, 2, ... ``worker_sampler`` seeds each worker's sampler with the
  base seed plus its number, so no two propose the same sequence, and worker 0 samples as a
  lone search with that seed does. Only worker 0 enqueues the seeded (sensitivity) trials.
- ``TrialGate`` runs before a trial's plan is measured. A trial beyond ``n_trials`` (the
  study already holds, or is finishing, that many) is not measured; nor is a plan the study
  already completed or another worker is measuring: its trial ends PRUNED with
  ``duplicate_of`` (the earlier trial) and the earlier trial's measurements, and does not
  count, so the completed trials are distinct plans. Once the sampler has repeated measured
  plans ``DUPLICATE_PATIENCE`` times in a row (a small plan space, exhausted), a repeat
  completes with the stored value instead (still ``duplicate_of``, still not measured again),
  so the study reaches ``n_trials``. ``remaining`` says how many trials to ask for, waiting
  while other workers finish the last ones, so N workers stop at exactly ``n_trials``.
- A worker killed inside ``ask`` (after its trial was created, before optuna's heartbeat for
  it began) leaves a RUNNING trial that never goes stale: ``remaining`` fails such an orphan
  (not begun: no ``worker`` attribute, which a trial sets first) once it is ``orphan_seconds``
  old, so the other workers do not wait for it forever.
- ``Claim``: one piece of work (a sweep cell) done by one worker at a time, through the
  same storage; a killed worker's claim lapses with its heartbeat.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import threading
import time
import warnings

import optuna

from .samplers import make_sampler

COMPLETE, RUNNING, PRUNED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.PRUNED,
)
DUPLICATE_PATIENCE = 10  # proposals in a row that repeat measured plans: the space is exhausted
POLL_SECONDS = 0.5  # how often a worker waiting for the others' last trials looks again
ORPHAN_MIN_SECONDS = 60.0  # an un-begun RUNNING trial this old (and 30 heartbeats) is a dead ask, not a slow sampler
# Of an earlier trial's attributes, what a repeat does not take over: who ran it, how it was
# proposed, and the windows it evaluated (a repeat evaluates none: search_cost counts windows).
_NOT_COPIED = {"worker", "seeded", "plan_key", "skipped", "duplicate_of", "windows", "perplexity_partial"}


def _worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _storage_of(study: optuna.Study):
    return study._storage  # noqa: SLF001 - optuna's own callbacks reach the storage the same way


def _ask(study: optuna.Study) -> optuna.Trial:
    """A trial outside optimize (a counter or a claim): optuna warns about heartbeats there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return study.ask()


def worker_number(study: optuna.Study, *, stored: bool) -> int:
    """This process's number among all that opened ``study`` (0 for an in-memory study)."""
    if not stored:
        return 0
    counter = optuna.create_study(
        storage=_storage_of(study), study_name=f"{study.study_name}:workers", load_if_exists=True
    )
    trial = _ask(counter)
    trial.set_user_attr("worker", _worker_label())
    counter.tell(trial, float(trial.number))
    return trial.number


def worker_sampler(sampler, config, number: int):
    """The sampler of worker ``number``: seeded ``base + number`` (a sampler instance as it is)."""
    if number == 0 or not isinstance(config.sampler, str):
        return sampler
    return make_sampler(config.sampler, seed=config.effective_sampler_seed + number, kwargs=config.sampler_kwargs)


def _fail_stale(study: optuna.Study) -> None:
    """Fail the RUNNING trials of killed workers (their heartbeat stopped), as optimize does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def orphan_seconds(heartbeat: float) -> float:
    """How old a RUNNING trial that never began must be before it counts as a dead worker's."""
    return max(ORPHAN_MIN_SECONDS, 30.0 * heartbeat)


def _fail_orphans(study: optuna.Study, after_seconds: float) -> None:
    """Fail RUNNING trials created more than ``after_seconds`` ago that never began (no
    ``worker`` attribute): their worker died inside ``ask``, before its heartbeat, so optuna
    never sees them go stale. Only stored studies with heartbeats have other workers."""
    if getattr(_storage_of(study), "get_heartbeat_interval", lambda: None)() is None:
        return
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(RUNNING,)):
        if "worker" not in t.user_attrs and (now - t.datetime_start).total_seconds() > after_seconds:
            try:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except ValueError:  # it finished meanwhile: it was alive after all
                pass


def measured(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts toward ``n_trials``: completed, or stopped by the pruner after
    part of its windows. A trial the gate skipped (surplus, a repeated plan) measured nothing."""
    if trial.state == COMPLETE:
        return True
    return trial.state == PRUNED and "skipped" not in trial.user_attrs and "duplicate_of" not in trial.user_attrs


def n_measured(study: optuna.Study) -> int:
    return sum(measured(t) for t in study.get_trials(deepcopy=False, states=(COMPLETE, PRUNED)))


def plan_key(low_components) -> str:
    """The identity of a plan within a study: the set of components that go low."""
    return hashlib.sha256("\n".join(sorted(low_components)).encode()).hexdigest()[:16]


class TrialGate:
    """Before a trial is measured: skip it when it is surplus or its plan was measured already."""

    def __init__(self, n_trials: int, *, orphan_after: float = ORPHAN_MIN_SECONDS):
        self.n_trials, self.orphan_after = n_trials, orphan_after
        self.repeats = 0  # duplicate proposals in a row, in this process
        self.exhausted = False
        self.surplus = False

    def __call__(self, trial: optuna.Trial, low_components) -> optuna.trial.FrozenTrial | None:
        """None: measure the plan. A completed trial: its stored value stands for this one (the
        plan space is exhausted). Raises optuna.TrialPruned: do not measure, do not count."""
        key = plan_key(low_components)
        trial.set_user_attr("plan_key", key)  # first, so a concurrent worker sees it (see below)
        trials = trial.study.get_trials(deepcopy=False)
        ahead = sum(measured(t) or (t.state == RUNNING and t.number < trial.number) for t in trials)
        if ahead >= self.n_trials:
            self.surplus = True
            trial.set_user_attr("skipped", "surplus: the study holds or is finishing its n_trials")
            raise optuna.TrialPruned("surplus trial")
        # Each of two trials of one plan sets its key before it looks, so at least one sees the other.
        same = [
            t
            for t in trials
            if t.number != trial.number and t.state in (COMPLETE, RUNNING) and t.user_attrs.get("plan_key") == key
        ]
        if not same:
            return None
        finished = [t for t in same if t.state == COMPLETE]
        earlier = next(
            (t for t in finished if "duplicate_of" not in t.user_attrs), finished[0] if finished else same[0]
        )
        if earlier.state == COMPLETE:  # the stored measurement stands for this trial too
            for name, value in earlier.user_attrs.items():
                if name not in _NOT_COPIED:
                    trial.set_user_attr(name, value)
        trial.set_user_attr("duplicate_of", earlier.number)
        trial.set_user_attr("windows", 0)
        if self.exhausted and earlier.state == COMPLETE:
            return earlier
        raise optuna.TrialPruned(f"the plan of trial {earlier.number}")

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """An optimize callback: stop on a surplus trial (``remaining`` waits); count repeats."""
        if "duplicate_of" in trial.user_attrs:
            self.repeats += 1
        elif trial.state == COMPLETE:
            self.repeats = 0
        self.exhausted = self.exhausted or self.repeats >= DUPLICATE_PATIENCE
        if self.surplus:
            study.stop()

    def remaining(self, study: optuna.Study) -> int:
        """How many more trials to ask for; 0 when done. Waits while others finish the last ones."""
        self.surplus = False
        while True:
            _fail_stale(study)  # a killed worker's trial stops counting
            _fail_orphans(study, self.orphan_after)  # and one killed before its heartbeat began
            done = n_measured(study)
            if done >= self.n_trials:
                return 0
            open_ = self.n_trials - done - len(study.get_trials(deepcopy=False, states=(RUNNING,)))
            if open_ > 0:
                return open_
            time.sleep(POLL_SECONDS)

    def notes(self) -> list[str]:
        if not self.exhausted:
            return []
        return [
            f"the sampler proposed plans already measured {DUPLICATE_PATIENCE} times in a row (few distinct "
            "plans meet this budget): later repeats completed with the stored values (duplicate_of), "
            "none was measured twice"
        ]


class Claim:
    """One piece of work (``name``, e.g. a sweep cell) claimed by one worker through ``storage``.

    The work has a study of its own; claiming asks a trial in it, and the claim holds while
    that trial is the lowest-numbered RUNNING or COMPLETE one (trial numbers are atomic, so of
    two workers claiming together exactly one holds). A heartbeat keeps it RUNNING; a killed
    worker's claim goes stale and is failed, and the work is free again. ``done(result)``
    completes it with the result (JSON-ready) stored beside it; ``result()`` reads it back.
    """

    def __init__(self, storage, name: str, *, heartbeat: int):
        self.storage, self.heartbeat = storage, heartbeat
        self.study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True)
        self.trial: optuna.Trial | None = None
        self._stop = threading.Event()

    def result(self) -> dict | None:
        done = self.study.get_trials(deepcopy=False, states=(COMPLETE,))
        return min(done, key=lambda t: t.number).user_attrs.get("result") if done else None

    def busy(self) -> bool:
        _fail_stale(self.study)
        return bool(self.study.get_trials(deepcopy=False, states=(RUNNING,)))

    def acquire(self) -> bool:
        """Claim the work; False when it is done or another worker holds it."""
        if self.result() is not None or self.busy():
            return False
        trial = _ask(self.study)
        self.trial = trial
        self._beat_once()  # a claim without a first heartbeat would never go stale
        others = self.study.get_trials(deepcopy=False, states=(COMPLETE, RUNNING))
        if any(t.number < trial.number for t in others):
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self.trial = None
            return False
        trial.set_user_attr("worker", _worker_label())
        threading.Thread(target=self._beat, daemon=True).start()
        return True

    def _beat_once(self) -> None:
        if hasattr(self.storage, "record_heartbeat"):
            self.storage.record_heartbeat(self.trial._trial_id)  # noqa: SLF001

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self._beat_once()

    def done(self, result: dict) -> None:
        self._stop.set()
        self.trial.set_user_attr("result", result)
        self.study.tell(self.trial, 0.0)

    def release(self) -> None:
        """Give the work back unfinished (an error or an interrupt): another worker may take it."""
        self._stop.set()
        if self.trial is not None:
            self.study.tell(self.trial, state=optuna.trial.TrialState.FAIL)
