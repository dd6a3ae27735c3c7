"""gemma_qlora.gc_scope: training runs with the heap built before it frozen, and gives it back."""


def test_training_runs_with_the_setup_heap_frozen(fast_cfg, monkeypatch):
    """make_trainer's train() freezes the heap built before it (gc.freeze) and gives it back after."""
    import gc

    from transformers import TrainerCallback

    import gemma_qlora.trainer

    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(gc.get_freeze_count())

    original = gemma_qlora.trainer.make_trainer

    def with_watch(*args, callbacks=(), **kwargs):
        return original(*args, callbacks=[*callbacks, Watch()], **kwargs)

    monkeypatch.setattr(gemma_qlora.trainer, "make_trainer", with_watch)
    import gemma_qlora.train

    monkeypatch.setattr(gemma_qlora.train, "make_trainer", with_watch)
    assert gc.get_freeze_count() == 0
    gemma_qlora.train.train(fast_cfg(steps=2))
    assert seen and all(count > 0 for count in seen)
    assert gc.get_freeze_count() == 0
