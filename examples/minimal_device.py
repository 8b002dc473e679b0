"""A minimal device: the built-in tools plus one custom tool, ``word_count``.

Run it against a server (see docs/cli.md for the three-terminal walkthrough)::

    UFO_TRIO_API_KEY=secret python examples/minimal_device.py --id dev-1

The same tools can be served by the CLI: ``python -m ufo_trio device --id dev-1
--tools examples/minimal_device.py:tools``.
"""

from __future__ import annotations

import argparse
import os

import trio

from ufo_trio.client import default_tools, open_device

# The built-ins (echo, system_info, and the disabled-by-default file and command tools)...
tools = default_tools()


# ...plus our own. A plain function runs in a worker thread; an `async def` would be awaited.
# Parameters are checked against the signature before the call: a plan that passes
# {"text": 3} gets a failure Result saying `text` must be a string.
@tools.tool("word_count", tool_type="data_collection")
def word_count(text: str, top: int = 3) -> dict[str, object]:
    """Count the words and lines of a text and list its most frequent words."""
    words = text.lower().split()
    counts: dict[str, int] = {}
    for word in words:
        counts[word] = counts.get(word, 0) + 1
    frequent = sorted(counts, key=lambda w: (-counts[w], w))[:top]
    return {"words": len(words), "lines": len(text.splitlines()), "most_frequent": frequent}


async def main(url: str, device_id: str, api_key: str | None) -> None:
    async with open_device(url, device_id, api_key=api_key, tools=tools) as device:
        # The line the end-to-end example waits for; flush so a pipe sees it at once.
        print(f"device {device.client_id} ready at {device.url}", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("UFO_TRIO_URL", "ws://127.0.0.1:5000/ws"))
    parser.add_argument("--id", default="dev-1", help="the device's client_id")
    parser.add_argument("--api-key", default=os.environ.get("UFO_TRIO_API_KEY"))
    args = parser.parse_args()
    try:
        trio.run(main, args.url, args.id, args.api_key)
    except KeyboardInterrupt:
        pass
