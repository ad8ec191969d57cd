"""`kdlm` with a pause after training step N (env KDLM_TEST_PAUSE_AT_STEP), so that a test can signal it mid-run.

Everything else is the real CLI; the pause only makes "mid-run" certain instead of a race with a fast run.
"""

from __future__ import annotations

import os
import time

from kdlm.cli import main
from kdlm.train.session import TrainLog

PAUSE_AT = int(os.environ["KDLM_TEST_PAUSE_AT_STEP"])
write_step = TrainLog.write


def _write_then_pause(self: TrainLog, record: dict) -> None:
    write_step(self, record)
    while record["step"] == PAUSE_AT:  # the test's signal arrives here (train_log.csv already has this step)
        time.sleep(0.05)


TrainLog.write = _write_then_pause
main()
