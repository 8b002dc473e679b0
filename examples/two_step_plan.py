"""A constellation that runs a two-step plan on a device and prints the outcome.

With a server and ``examples/minimal_device.py`` running::

    UFO_TRIO_API_KEY=secret python examples/two_step_plan.py --target dev-1

Exit status 0 if the task completed.
"""

from __future__ import annotations

import argparse
import os
import sys

import trio

from ufo_trio.client import Command, Plan, TaskOutcome, format_outcome, open_constellation

TEXT = "the quick brown fox jumps over the lazy dog\nthe dog sleeps"

# Each step becomes one COMMAND frame; the server's `script` agent sends step 1 only after
# step 0 succeeded (on_failure="stop").
PLAN = Plan.of(
    Command(
        tool_name="word_count",
        tool_type="data_collection",
        parameters={"text": TEXT, "top": 2},
    ),
    Command(tool_name="system_info", tool_type="data_collection"),
)


async def run_plan(url: str, target: str, api_key: str | None) -> TaskOutcome:
    """Connect as a constellation scoped to *target*, look at it, run `PLAN` on it."""
    async with open_constellation(
        url, "example-orchestrator", target_id=target, api_key=api_key
    ) as constellation:
        info = await constellation.device_info(target)
        print(f"target {target} runs {info.get('os')} on {info.get('hostname')}", flush=True)
        return await constellation.run_task(
            target, PLAN, task_name="example-two-steps", timeout=60
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("UFO_TRIO_URL", "ws://127.0.0.1:5000/ws"))
    parser.add_argument("--target", default="dev-1", help="the device's client_id")
    parser.add_argument("--api-key", default=os.environ.get("UFO_TRIO_API_KEY"))
    args = parser.parse_args()
    outcome = trio.run(run_plan, args.url, args.target, args.api_key)
    print(format_outcome(outcome, PLAN))
    sys.exit(0 if outcome.ok else 1)
