"""Made-up `train-tiny` run directories, chained by ``init_from`` as real runs are."""

import json


def fake_run(root, name, parent, steps, stopped=None, loss_of=None):
    """``root/name`` as `train-tiny` leaves it: its options (``init_from`` the run ``parent`` or
    none), the step it stopped at (``stopped``; none: it ran to the end) and, given ``loss_of``,
    a loss log of ``steps`` lines whose main loss is ``loss_of``."""
    run = root / name
    (run / "train_state").mkdir(parents=True)
    (run / "train_options.json").write_text(json.dumps(
        {"steps": steps, "seed": len(name), "init_from": str(root / parent) if parent else None}))
    if stopped is not None:
        (run / "train_state" / "step.json").write_text(json.dumps({"step": stopped}))
    if loss_of is not None:
        (run / "loss.jsonl").write_text("".join(
            json.dumps({"step": i, "main": loss_of, "mtp": 1.0, "indexer_kl": 0.5}) + "\n" for i in range(steps)))
    return run
