"""One ``paca bench`` job in its own process, plus the allocator's reserved peak: ``python -m paca_core.doctor.worker JOB RESULT``.

The bench worker (:func:`paca_core.bench.worker.run_job`) reports the allocated peak; the doctor also needs
what the caching allocator reserved over the same window (the bench resets both peaks before its timed
steps), which is read here, in the worker's process, right after the job.
"""
from __future__ import annotations

import devices

from ..bench.worker import run_job, worker_main


def run_job_with_reserved(job: dict) -> dict:
    """:func:`run_job`, and ``reserved_peak_bytes`` of its device (None where the runtime has no such figure)."""
    result = run_job(job)
    if result.get("status") == "ok":
        device = devices.resolve_device(job.get("device"))
        devices.synchronize(device)
        result["reserved_peak_bytes"] = devices.runtime_for(device).reserved_peak_bytes(device)
    return result


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, run_job_with_reserved, "paca_core.doctor.worker")


if __name__ == "__main__":
    raise SystemExit(main())
