"""Run lmms-eval's own evaluator (``simple_evaluate``, its ``openai`` model, its task loader) over exported tasks.

``python lmms_driver.py INCLUDE_PATH TASK[,TASK...] BASE_URL MODEL OUT.json``: writes each task's aggregate
numbers (lmms-eval's ``METRIC,none`` keys without the filter suffix) and the answer lmms-eval logged per doc id.
The ``lmms-eval`` command line calls the same function and then prints a table with pytablewriter.
"""

from __future__ import annotations

import json
import sys

from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager


def main() -> None:
    include, tasks, base_url, model, out = sys.argv[1:6]
    res = simple_evaluate(model="openai", model_args=f"model_version={model},base_url={base_url}",
                          tasks=tasks.split(","), task_manager=TaskManager(include_path=include), batch_size=1,
                          log_samples=True, bootstrap_iters=0)
    numbers = {t: {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and "_stderr" not in k}
               for t, r in res["results"].items()}
    answers = {t: {s["doc"]["id"]: s["filtered_resps"][0] for s in samples} for t, samples in res["samples"].items()}
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"numbers": numbers, "answers": answers}, f)


if __name__ == "__main__":
    main()
