"""`python -m bench.fakemodel`: `ufo_trio.testing.FakeChatModel` as its own process, for the llm
scenarios. Prints `fake model listening on <base_url>` once it is up.

The rule: the task's text is `steps=<n>`; the model calls `bench_tool` once per turn until the
conversation holds n tool results, then answers `done`. `--delay` holds every answer that long.
"""

from __future__ import annotations

import argparse
import re
import sys

import trio

from ufo_trio.testing import FakeChatModel, FakeReply, FakeRequest

_STEPS = re.compile(r"steps=(\d+)")


def rule(request: FakeRequest) -> FakeReply:
    messages = request.messages
    text = messages[1].get("content") if len(messages) > 1 else ""
    m = _STEPS.search(text if isinstance(text, str) else "")
    wanted = int(m.group(1)) if m else 1
    done = sum(1 for message in messages if message.get("role") == "tool")
    if done < wanted:
        return FakeReply.call("bench_tool", {"n": done})
    return FakeReply.answer("done")


async def serve(delay: float) -> None:
    model = FakeChatModel(rule=rule, delay=delay)
    async with model:
        print(f"fake model listening on {model.base_url}", flush=True)
        while True:
            await trio.sleep(3600)
            model.requests.clear()  # keep memory flat on long runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fakemodel")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args(argv)
    try:
        trio.run(serve, args.delay)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
