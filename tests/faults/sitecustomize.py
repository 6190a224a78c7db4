"""Fault injection for the subprocess tests: on PYTHONPATH, Python imports this at start-up in every rank.

SUBFORE_TEST_FAULT="KIND@STEP[:RANK]" acts when optimiser step STEP (1-based) begins on RANK (default: all):
``kill9`` (SIGKILL, nothing saved), ``sigterm``/``sigusr1`` (the signal to this process), ``nan`` (this rank's
loss becomes NaN). STEP ``*`` means every step; STEP ``start`` sends the signal while the run is being set up
(before Lightning's trainer exists), STEP ``fit`` inside Trainer.fit before training starts.
"""

import os

_spec = os.environ.get("SUBFORE_TEST_FAULT")
if _spec:
    import signal

    from subfore.engine import RunModule

    _kind, _where = _spec.split("@")
    _step, _, _rank = _where.partition(":")

    def _hit(module) -> bool:
        step_ok = _step == "*" or (_step.isdigit() and module.global_step + 1 == int(_step))
        return step_ok and (not _rank or module.global_rank == int(_rank))

    _start = RunModule.on_train_batch_start

    def on_train_batch_start(self, batch, batch_idx):
        _start(self, batch, batch_idx)
        if _hit(self) and self.micro_batch == 0:
            if _kind == "kill9":
                os.kill(os.getpid(), signal.SIGKILL)
            elif _kind in ("sigterm", "sigusr1"):
                os.kill(os.getpid(), signal.SIGTERM if _kind == "sigterm" else signal.SIGUSR1)

    _note = RunModule.note_loss

    def note_loss(self, loss, shown=None):
        if _kind == "nan" and _hit(self):
            loss = loss * float("nan")
        _note(self, loss, shown)

    def _nan_loss(training_step):
        def wrapped(self, batch, batch_idx):
            loss = training_step(self, batch, batch_idx)
            # The loss that goes through backward is NaN too, as in a real divergence.
            return loss * float("nan") if _kind == "nan" and _hit(self) else loss

        return wrapped

    from subfore.finetune import SegmentationModel
    from subfore.pretrain import MaskedImageModel

    for _cls in (MaskedImageModel, SegmentationModel):
        _cls.training_step = _nan_loss(_cls.training_step)

    if _step == "fit":
        # Inside Trainer.fit just before training: the loader's first iteration (Lightning's handlers are up).
        from subfore.engine import StepSampler

        _iter = StepSampler.__iter__

        def __iter__(self):
            if not _rank or self.rank == int(_rank):
                os.kill(os.getpid(), signal.SIGTERM if _kind == "sigterm" else signal.SIGUSR1)
            return _iter(self)

        StepSampler.__iter__ = __iter__

    if _step == "start":
        import subfore.pretrain.run

        _make_trainer = subfore.pretrain.run.make_trainer

        def make_trainer(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM if _kind == "sigterm" else signal.SIGUSR1)
            return _make_trainer(*args, **kwargs)

        subfore.pretrain.run.make_trainer = make_trainer
    RunModule.on_train_batch_start = on_train_batch_start
    RunModule.note_loss = note_loss
