"""A robot-style control loop that embeds the assistant without ROS.

    python -m onsight.runtime.robot_example --engine engines/demo --source demo

The robot owns its camera (here OpenCV on any source onsight reads) and runs a fixed-rate
control loop; perception runs on its own thread through `Assistant.push`, so a slow model
never stalls control. Narrations land in a queue the control loop drains each tick; the
answer to a question is a Future it polls.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
import time

from onsight.runtime.assistant import Assistant, AssistantConfig
from onsight.runtime.capture import open_source
from onsight.runtime.events import AnswerEvent, NarrationEvent
from onsight.runtime.frames import Frame
from onsight.runtime.synthetic.cli import resolve_source

log = logging.getLogger("robot")


def perception(assistant: Assistant, source: str, out: queue.Queue, stop: threading.Event) -> None:
    with open_source(resolve_source(source), fps=assistant.fps, realtime=True) as camera:
        for item in camera:
            if stop.is_set():
                return
            if isinstance(item, Frame):
                for event in assistant.push(item.image, item.timestamp):
                    out.put(event)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="engines/demo")
    p.add_argument("--source", default="demo")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--hz", type=float, default=20.0, help="control loop rate")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    with Assistant(a.engine, AssistantConfig()) as assistant:
        worker = threading.Thread(
            target=perception, args=(assistant, a.source, events, stop), daemon=True
        )
        worker.start()
        # a Future: the control loop polls it without blocking (a planner thread could wait
        # on it with .result(timeout=...)); the answer also arrives among the events
        count = assistant.ask("how many objects are there?")
        t_end, tick = time.monotonic() + a.seconds, 1.0 / a.hz
        while time.monotonic() < t_end and worker.is_alive():
            t0 = time.monotonic()
            # ... read sensors, run the controller, command the motors here ...
            if count is not None and count.done():
                if count.exception() is not None:  # closed, or the model failed on that frame
                    log.warning("no answer: %s", count.exception())
                else:
                    answer: AnswerEvent = count.result()
                    log.info("answered at t=%.1fs: %s", answer.frame_timestamp, answer.text)
                count = None
            while not events.empty():
                ev = events.get_nowait()
                if isinstance(ev, NarrationEvent):
                    log.info("heard at t=%.1fs: %s", ev.frame_timestamp, ev.text)
                    # A ROS 2 node would publish here, e.g.
                    #   self.narration_pub.publish(String(data=ev.text))
            time.sleep(max(0.0, tick - (time.monotonic() - t0)))
        stop.set()
        worker.join(timeout=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
