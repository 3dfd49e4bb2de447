"""Set-up shared by the test suite (tests/) and the benchmarks (benchmarks/)."""

import signal


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# A pytest run stopped by `timeout` (SIGTERM: the GPU check cuts each suite and benchmark file at its
# deadline) ends as an interrupted session: a suite still prints its summary and slowest tests, a
# benchmark file still writes --benchmark-json with the cases that finished, instead of dying with
# nothing said and the JSON opened and empty.
signal.signal(signal.SIGTERM, _stop)
