"""Write lm-evaluation-harness task files for the data pack's multiple-choice eval sets
(``context`` / ``choices`` / ``gold`` rows, choices with their leading space), so that
lm-eval scores exactly the examples ``finemoe eval --tasks`` scores, offline:

    python tools/lm_eval_tasks.py ../shared/data/evals -o .cache/lm_eval_tasks
    finemoe lm-eval --model finemoe --model_args path=runs/smollm2 --include_path .cache/lm_eval_tasks \\
        --tasks pack_piqa,pack_arc_easy --limit 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finemoe.evaluate import lm_eval_task_yaml

MULTIPLE_CHOICE = ("arc_challenge", "arc_easy", "copa", "hellaswag", "openbookqa", "piqa", "sciq", "boolq")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evals_dir")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in MULTIPLE_CHOICE:
        path = Path(args.evals_dir).resolve() / f"{name}.jsonl.gz"
        if path.is_file():
            (out / f"pack_{name}.yaml").write_text(lm_eval_task_yaml(f"pack_{name}", path))
            print(f"pack_{name}: {path}")


if __name__ == "__main__":
    main()
