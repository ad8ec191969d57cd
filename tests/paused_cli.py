"""`kdlm` with a pause after training step N (env KDLM_TEST_PAUSE_AT_STEP), so that a test can signal it mid-run.

Everything else is the real CLI; the pause only makes "mid-run" certain instead of a race with a fast run.
"""

from __future__ import annotations

import os
import time

import kdlm.train.loop as loop
from kdlm.cli import main

PAUSE_AT = int(os.environ["KDLM_TEST_PAUSE_AT_STEP"])
log_step = loop._log


def _log_then_pause(record: dict, log_file, writer) -> None:
    log_step(record, log_file, writer)
    while record["step"] == PAUSE_AT:  # the test's signal arrives here (train_log.csv already has this step)
        time.sleep(0.05)


loop._log = _log_then_pause
main()
