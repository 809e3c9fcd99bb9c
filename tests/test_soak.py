"""The chaos soak, short: `scripts/soak` for 30 s on the session's SeaweedFS.

Workers load, stream, hold, release early, evict and kill themselves; the proxy injects
store faults; the daemon is SIGKILLed and restarted once. Every byte a worker is handed
is compared with the source. See devtools/soak_report.py for the errors it expects.
"""

from __future__ import annotations

import sys

from tensorferry.devtools import soak
from tensorferry.devtools.s3server import S3Server


def test_a_short_soak_gives_no_wrong_byte_no_leak_and_no_hang(s3: S3Server) -> None:
    opts = soak.Options(seconds=30, workers=3, seed=20261206, deadline=30)
    report = soak.run(opts, s3=s3, log=sys.stderr)
    print(report.summary())
    assert report.mismatches == []
    assert report.failures() == [], report.summary()
    # The soak did what it says: many verified loads, faults fired, one restart.
    assert report.loads_verified >= 20, report.summary()
    assert sum(report.faults.values()) >= 5, report.summary()
    assert report.daemon_restarts == 1
