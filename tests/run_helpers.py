"""Shared by the resume tests (test_train, test_adversarial, test_device)."""

from flatlib.runner.runs import Run


def interrupt(run: Run, drop_steps: tuple[int, ...]) -> None:
    """Make a finished ``run`` look interrupted: remove its finished marker and the checkpoints at
    ``drop_steps`` (the last ones), as if the process had died after the checkpoint before them."""
    (run.dir / "FINISHED").unlink()
    for step in drop_steps:
        run.checkpoint_path(step).unlink()
        run.checkpoint_path(step).with_suffix(".sha256").unlink()
