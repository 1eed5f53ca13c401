from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.demo_model", description=__doc__)
    p.add_argument("stage", choices=["build", "synth", "train", "overfit", "finetune", "evaluate", "ship"])
    p.add_argument("--out", type=Path, default=Path("build/demo"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--n-train", type=int, default=3000, help="train utterances per language")
    p.add_argument("--n-test", type=int, default=100, help="held-out test utterances per language")
    p.add_argument("--minutes", type=float, default=100.0, help="training time budget (wall clock of the training loop)")
    p.add_argument("--ft-minutes", type=float, default=40.0,
                   help="multi-utterance fine-tune budget after the main run (0 = skip)")
    p.add_argument("--ft-silence-minutes", type=float, default=30.0,
                   help="then the long-silence fine-tune (seconds of silence before and between utterances; 0 = skip)")
    p.add_argument("--ft-stage", choices=["concat", "silence"], default="concat",
                   help="`finetune`: which stage to run (for --minutes)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = time budget only)")
    p.add_argument("--skip-overfit", action="store_true", help="build: skip the 48-utterance overfit sanity check")
    p.add_argument("--repo", type=Path, default=Path("."), help="repo root for `ship`")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage in ("build", "synth"):
        from .synth import synth
        synth(a.out, n_train=a.n_train, n_test=a.n_test, seed=a.seed)
    if a.stage == "overfit" or (a.stage == "build" and not a.skip_overfit):
        from .train import overfit
        res = overfit(a.out, seed=a.seed)
        if a.stage == "build" and not res.get("ok"):
            raise SystemExit("overfit check failed: the model does not learn 48 utterances; not starting the long run")
    if a.stage in ("build", "train"):
        from .train import train
        train(a.out, seed=a.seed, minutes=a.minutes, max_steps=a.max_steps)
    if a.stage == "finetune":
        from .train import FT_STAGES, finetune
        finetune(a.out, FT_STAGES[a.ft_stage], seed=a.seed, minutes=a.minutes)
    if a.stage == "build":
        from .train import FT_STAGES, finetune
        for name, minutes in (("concat", a.ft_minutes), ("silence", a.ft_silence_minutes)):
            if minutes > 0:
                finetune(a.out, FT_STAGES[name], seed=a.seed, minutes=minutes)
    if a.stage in ("build", "evaluate"):
        from .evaluate import evaluate
        evaluate(a.out)
    if a.stage in ("build", "ship"):
        from .evaluate import ship
        ship(a.out, a.repo)
