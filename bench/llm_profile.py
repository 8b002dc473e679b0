"""Where one llm step's CPU goes, client side: `python -m bench.llm_profile [--cprofile]`.

Runs the llm agent's loop in this process (`LlmAgent.run` with a session context whose device
answers at once, so no WebSocket or session code is measured) against `bench.fakemodel` in its
own process over real loopback HTTP, and prints this process's CPU per step. With `--cprofile`
it then profiles a second run and prints the share of self time per package (and per ufo_trio
function). Together with `llm-steps` (whole server) it tells what a step costs beyond a script
step: the model call and the agent. Figures are indicative on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import logging
import pstats
import re
import subprocess
import sys
import time
from typing import Any

import trio

from ufo_trio._llm import LlmAgent, LlmSettings, OpenAIChatModel
from ufo_trio._messages import ClientType, Command, Result, ResultStatus

from .loadgen import BENCH_TOOLS


class _Context:
    """A SessionContext whose device answers every COMMAND at once."""

    session_id = "bench"
    task_name = "bench"
    platform = "linux"
    requester_id = "bench-const"
    requester_type = ClientType.CONSTELLATION
    executor_id = "bench-dev"
    system_info: dict[str, Any] = {"platform": "linux", "hostname": "bench"}  # noqa: RUF012
    log = logging.LoggerAdapter(logging.getLogger("bench"))

    def __init__(self, steps: int) -> None:
        self.request = f"steps={steps}"

    async def execute(self, commands: list[Command], **_: Any) -> list[Result]:
        if commands[0].tool_name == "list_tools":
            return [Result(status=ResultStatus.SUCCESS, result=BENCH_TOOLS, call_id="0")]
        return [
            Result(status=ResultStatus.SUCCESS, result="ok", call_id=str(i))
            for i in range(len(commands))
        ]

    async def record_model_turn(self, turn: Any) -> None:
        """The task history is not part of this profile."""

    async def hold_cpu(self) -> None:
        """One session alone: the CPU gate would never make it wait."""

    def release_cpu(self) -> None:
        pass


async def _run(base_url: str, steps: int, tasks: int, profile: cProfile.Profile | None) -> float:
    settings = LlmSettings(base_url=base_url, model="bench", max_steps=steps + 1)
    async with OpenAIChatModel(settings) as model:
        agent = LlmAgent(settings, model)
        await agent.run(_Context(2))  # warm the connection
        cpu = time.process_time()
        if profile is not None:
            profile.enable()
        for _ in range(tasks):
            outcome = await agent.run(_Context(steps))
            assert outcome["answer"] == "done", outcome
        if profile is not None:
            profile.disable()
        return (time.process_time() - cpu) / (steps * tasks)


def _shares(profile: cProfile.Profile, top: int) -> str:
    by: collections.Counter[str] = collections.Counter()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    for (file, _line, function), (_cc, _nc, self_time, _ct, _callers) in stats.items():
        if "site-packages/" in file:
            key = file.split("site-packages/")[1].split("/")[0]
        elif "/ufo_trio/" in file:
            key = f"ufo_trio {function}"
        elif file == "~":
            key = f"builtin {function}"
        else:
            key = "stdlib " + file.rsplit("/", 1)[-1]
        by[key] += self_time
    total = sum(by.values()) or 1.0
    return "\n".join(f"{v / total * 100:5.1f}%  {k}" for k, v in by.most_common(top))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llm_profile")
    parser.add_argument("--steps", type=int, default=50, help="steps per task (default 50)")
    parser.add_argument("--tasks", type=int, default=10, help="tasks measured (default 10)")
    parser.add_argument("--cprofile", action="store_true", help="also print where the CPU goes")
    parser.add_argument("--top", type=int, default=20, help="rows of the profile table")
    args = parser.parse_args(argv)
    model = subprocess.Popen(
        [sys.executable, "-m", "bench.fakemodel"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert model.stdout is not None
        match = re.search(r"listening on (\S+)", model.stdout.readline())
        if match is None:
            print("bench.fakemodel did not start", file=sys.stderr)
            return 1
        url = match.group(1)
        per_step = trio.run(_run, url, args.steps, args.tasks, None)
        print(f"client CPU per llm step (agent + model call): {per_step * 1e6:.0f} µs")
        if args.cprofile:
            profile = cProfile.Profile()
            trio.run(_run, url, args.steps, max(1, args.tasks // 2), profile)
            print("self time by package (under cProfile):")
            print(_shares(profile, args.top))
    finally:
        model.terminate()
        model.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
