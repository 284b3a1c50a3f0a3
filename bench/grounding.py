"""Does FAQ grounding make a real model answer the team's questions asked in other words?

    python bench/grounding.py                      # SmolLM2-135M-Instruct, no retrain
    python bench/grounding.py --model DIR_OR_GGUF  # another model

The real thing, as a user meets it: the embedded Redis of a temporary data dir, the eight
made-up team facts of ``bench/data/learning.json`` added with ``/faq add``, and a
``sprbot worker inference`` asked over the bus, one question at a time, greedy. Three runs of
the worker:

* ``off``: grounding off, the model alone (it knows none of the facts);
* ``context``: grounding on with ``SPRBOT_FAQ_THRESHOLD=0.99``, so that no question is answered
  from the FAQ directly: every one goes to the model with the closest entries as context;
* ``default``: grounding on with the default threshold, as shipped: close questions get the
  entry's answer, the rest go to the model with context.

Asked: the eight questions in the tests' other words (``reworded``), a second wording of each
(``reworded_alt``) and ten general questions (grounding must not spoil those). An answer is
right when it holds one of the item's key words. Target (issue 14): ``context`` gets >= 7 of
the 8 ``reworded`` right.

Prints a table and writes JSON (default ``bench/results/grounding.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(BENCH_DIR.parent))

ADMIN = "bench-admin"
CHANNEL = "console-bench"
DATA = BENCH_DIR / "data" / "learning.json"
TARGET_REWORDED = 7
RUNS = {  # name: SPRBOT_ settings of the worker
    "off": {"SPRBOT_FAQ_GROUNDING": "off"},
    "context": {"SPRBOT_FAQ_GROUNDING": "on", "SPRBOT_FAQ_THRESHOLD": "0.99"},
    "default": {"SPRBOT_FAQ_GROUNDING": "on"},
}
SETS = (("reworded", "faq"), ("reworded_alt", "faq"), ("question", "general"))


def right(answer: str, keys: list[str]) -> bool:
    return any(k.lower() in answer.lower() for k in keys)


def ask(bus: Any, text: str, timeout_s: float = 300) -> str:
    """One question over the bus, as an adapter sends it; the final reply's text."""
    from bot.schemas import ChatRequest, request_id

    request = ChatRequest(
        id=request_id("bench", text, time.time_ns()),
        channel=CHANNEL,
        conversation=f"bench/{time.time_ns()}",  # a fresh conversation: no memory between
        user_id="bench-user",
        text=text,
    )
    if not bus.submit(request).accepted:
        raise RuntimeError(f"the bus refused {text!r}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for reply in bus.read_replies(CHANNEL, "bench", block_ms=200):
            bus.ack_replies(CHANNEL, reply.entry_id)
            event = reply.event
            if event.request_id == request.id and event.kind in ("final", "error"):
                return event.text
    raise RuntimeError(f"no reply to {text!r} within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="A model folder or .gguf file (default: the demo's SmolLM2, imported)."
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="SPRBOT_MAX_NEW_TOKENS.")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "grounding.json"))
    args = parser.parse_args(argv)

    spec = importlib.util.spec_from_file_location("bench_retrain", BENCH_DIR / "retrain.py")
    bench_retrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_retrain)

    from bot.commands import dispatch
    from inference.worker import FAQ_PREFIX

    data = json.loads(DATA.read_text())
    results: dict[str, Any] = {"args": vars(args), "runs": {}}
    with bench_retrain.bench_stack(
        "sprbot-bench-grounding-", args.model, SPRBOT_MAX_NEW_TOKENS=str(args.new_tokens)
    ) as stack:
        results["model"] = stack.model
        for item in data["faq"]:
            reply = dispatch(f"/faq add {item['question']} | {item['answer']}", stack.admin)
            if not reply.startswith("Added"):
                raise RuntimeError(reply)
        for run, overrides in RUNS.items():
            print(f"run {run}...", file=sys.stderr)
            worker = bench_retrain.sprbot("worker", "inference", env={**stack.env, **overrides})
            try:
                bench_retrain.wait_for(
                    lambda w=worker: bench_retrain.heartbeat_version(stack.client, w.pid),
                    600,
                    "the worker",
                )
                results["runs"][run] = {"settings": overrides}
                for field, items in SETS:
                    rows = []
                    for item in data[items]:
                        answer = ask(stack.bus, item[field])
                        rows.append(
                            {
                                "question": item[field],
                                "answer": answer,
                                "right": right(answer, item["key"]),
                                "from_faq": answer.startswith(FAQ_PREFIX),
                            }
                        )
                    results["runs"][run][field if items == "faq" else "general"] = rows
            finally:
                bench_retrain.stop([worker])

    def count(rows: list[dict], key: str = "right") -> str:
        return f"{sum(r[key] for r in rows)}/{len(rows)}"

    header = f"{'run':<9}{'reworded':>10}{'second wording':>16}{'general':>9}{'from the FAQ':>14}"
    print(header)
    for run, r in results["runs"].items():
        direct = sum(x["from_faq"] for x in r["reworded"] + r["reworded_alt"])
        print(
            f"{run:<9}{count(r['reworded']):>10}{count(r['reworded_alt']):>16}"
            f"{count(r['general']):>9}{direct:>11}/16"
        )
    got = sum(x["right"] for x in results["runs"]["context"]["reworded"])
    met = got >= TARGET_REWORDED
    results["target"] = {"reworded_with_context_at_least": TARGET_REWORDED, "met": met}
    print(f"target: >= {TARGET_REWORDED}/8 reworded with context: {'met' if met else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
