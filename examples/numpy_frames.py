"""A zero-copy video-frame pipeline: a producer process streams frames to an async consumer.

The producer fills each frame *in place*, in a slot of shared memory
(``tx.send_loan``); the consumer reads it where it lies (``rx.views()``) and checks
every pixel. No frame is pickled or copied on the way. The consumer prints frames/s and
GB/s.

    python examples/numpy_frames.py [--frames 300] [--height 1080] [--width 1920]
                                    [--capacity 4] [--start-method spawn]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time

import numpy as np

import aioshm


def producer(tx: aioshm.SendChannel[np.ndarray], frames: int, shape: tuple[int, ...]) -> None:
    """A child process: fill each frame in its slot, then publish it."""

    async def main() -> None:
        async with tx:  # closing the only send handle ends the stream
            for i in range(frames):
                async with tx.send_loan(shape, np.uint8) as frame:
                    frame.fill(i % 256)  # stands in for decoding or rendering a frame
                # leaving the block published the frame

    aioshm.run_child(main)  # asyncio.run(main()), Ctrl-C left to the parent
    print(f"producer: sent {frames} frames", flush=True)


async def consume(rx: aioshm.ReceiveChannel[np.ndarray]) -> tuple[int, float]:
    """Receive frames until the stream ends; return how many, and the seconds from the
    first to the last."""
    received = 0
    started = 0.0
    async with rx:
        # each frame is read-only and valid until the next iteration; the loop ends when
        # the producer closes its handle: every frame is in
        async for frame in rx.views():
            if received == 0:
                started = time.perf_counter()
            expected = received % 256
            # min and max read every byte of the frame, where it lies
            if not frame.min() == frame.max() == expected:
                raise RuntimeError(f"frame {received} is corrupt")
            received += 1
    return received, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="frames to stream")
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--capacity", type=int, default=4, help="frames in flight at once")
    parser.add_argument("--start-method", default=multiprocessing.get_start_method())
    args = parser.parse_args()

    shape = (args.height, args.width, 3)
    frame_bytes = args.height * args.width * 3
    tx, rx = aioshm.open_channel[np.ndarray](capacity=args.capacity, max_message_size=frame_bytes)
    ctx = multiprocessing.get_context(args.start_method)
    proc = ctx.Process(target=producer, args=(tx, args.frames, shape))
    proc.start()
    tx.close()  # the child owns the handle passed to it

    frames, seconds = asyncio.run(consume(rx))
    proc.join()
    print(
        f"consumer: received {frames} frames of {args.height}x{args.width}x3 uint8 "
        f"({frame_bytes:,} bytes each), every pixel checked"
    )
    if frames > 1 and seconds > 0:
        rate = (frames - 1) / seconds  # the clock starts when the first frame arrives
        print(f"throughput: {rate:.1f} frames/s, {rate * frame_bytes / 1e9:.3f} GB/s")
    return proc.exitcode or 0


if __name__ == "__main__":
    sys.exit(main())
