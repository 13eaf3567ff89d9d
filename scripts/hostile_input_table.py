"""Runs every hostile input of ``tests/support/hostile.py`` through a real scoring run (a local Ray cluster, tiny
models, nothing downloaded) and prints, in Markdown, what became of each, then the reconciliation: the
table in docs/reliability.md. Exits 1 if any outcome differs from the one the cases state.

    .venv/bin/python scripts/hostile_input_table.py
"""

import json
import sys
import tempfile
from pathlib import Path

from perceptclip.model.debug import make_tiny_artifact
from perceptclip.scoring.config import load_score_config
from perceptclip.scoring.job import run_score

# the hostile cases are the tests' (the same cases tests/test_hostile.py checks): not in the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.hostile import IGNORED, MAX_PIXELS, observe, write_hostile_shards  # noqa: E402


def outcome_text(outcome) -> str:
    if outcome.case.key is None:
        return f"shard failed: `{outcome.got}`"
    if outcome.got == IGNORED:
        return "no row (not a sample)"
    return "ok" if outcome.got == "ok" else f"error row: `{outcome.got}`"


def details(outcome) -> str:
    return ", ".join(f"{name} {json.dumps(value, ensure_ascii=False)}" for name, value in outcome.columns.items())


def main() -> int:
    with tempfile.TemporaryDirectory() as root:
        cases = write_hostile_shards(f"{root}/shards")
        models = [make_tiny_artifact(f"{root}/iqa", task="iqa", seed=1),                  # multi-crop
                  make_tiny_artifact(f"{root}/memorability", task="memorability", seed=3)]  # resize, crop
        cfg = load_score_config(None, input=[f"{root}/shards/*"], output=f"{root}/scores", models=models,
                                max_pixels=MAX_PIXELS, num_cpus=2)
        summary = run_score(cfg, progress=lambda line: print(line, file=sys.stderr)).to_dict()
        outcomes, rec = observe(cases, f"{root}/scores", summary)
    print("| input | shard | key | outcome | checked values |")
    print("|---|---|---|---|---|")
    for o in outcomes:
        key = "" if o.case.key is None else f"`{o.case.key!r}`"
        mark = "" if o.as_expected else f" **(stated: {o.case.expect})**"
        print(f"| {o.case.what} | `{o.case.shard}` | {key} | {outcome_text(o)}{mark} | {details(o)} |")
    print()
    print(f"Reconciliation: {rec['input_samples']} input samples (distinct keys in the readable shards) = "
          f"{rec['rows']} rows written ({rec['ok']} ok, {rec['error']} error); duplicates {rec['duplicates']}, "
          f"lost {rec['lost']}, rows for no input {rec['unexpected']}; {rec['failed_shards']} shards failed, "
          f"each with its reason. Summary: {summary['samples']['total']} rows, errors by reason "
          f"{summary['samples']['errors_by_reason']}.")
    ok = all(o.as_expected for o in outcomes) and rec["rows"] == rec["input_samples"] and \
        rec["duplicates"] == rec["lost"] == rec["unexpected"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
