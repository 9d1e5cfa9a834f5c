"""The shape of ``proof.json`` (``paca doctor``), as data, and a hand check of it (no jsonschema dependency).

A proof from a lent machine is compared with later ones and kept in ``docs/hardware/``; the check is what
``tests/test_doctor.py`` runs on the dry run's proof, and what the doctor runs on its own output before
writing it, so a field cannot silently disappear or change type.
"""
from __future__ import annotations

from typing import Any

SCHEMA_NAME = "paca-doctor-proof/1"
#: Stage names, in the order they run.
STAGES = ("device", "tests", "bench", "planner", "max_context")
STATUSES = ("ok", "failed", "skipped", "timeout")

_NUMBER = (int, float)
_OPTIONAL_STR = (str, type(None))

#: key -> accepted types, for the document's top level.
TOP_LEVEL: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "tool": (str,),
    "version": (str,),
    "commit": _OPTIONAL_STR,
    "command": (str,),
    "mode": (str,),
    "dry_run": (bool,),
    "hardware_measurement": (bool,),
    "device": (str,),
    "started_at": (str,),
    "finished_at": _OPTIONAL_STR,
    "seconds": _NUMBER,
    "deadline_s": _NUMBER,
    "complete": (bool,),
    "environment": (dict,),
    "stages": (list,),
    "summary": (dict,),
}
#: key -> accepted types, for each entry of ``stages``.
STAGE: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "status": (str,),
    "reason": _OPTIONAL_STR,
    "seconds": _NUMBER,
    "budget_s": _NUMBER,
    "result": (dict,),
}
ENVIRONMENT: dict[str, tuple[type, ...]] = {"python": (str,), "platform": (str,), "packages": (dict,)}
SUMMARY: dict[str, tuple[type, ...]] = {status: (int,) for status in STATUSES}
MODES = ("full", "quick", "dry-run")


def _check_keys(where: str, document: Any, fields: dict[str, tuple[type, ...]]) -> list[str]:
    if not isinstance(document, dict):
        return [f"{where} is {type(document).__name__}, not an object"]
    problems = []
    for key, types in fields.items():
        if key not in document:
            problems.append(f"{where} has no {key!r}")
        elif not isinstance(document[key], types) or (isinstance(document[key], bool) and bool not in types):
            problems.append(f"{where}[{key!r}] is {type(document[key]).__name__}, expected {'/'.join(t.__name__ for t in types)}")
    return problems


def check_proof(document: Any) -> list[str]:
    """Every way ``document`` departs from the proof's shape (empty: it conforms)."""
    problems = _check_keys("proof", document, TOP_LEVEL)
    if problems:
        return problems
    if document["schema"] != SCHEMA_NAME:
        problems.append(f"schema is {document['schema']!r}, expected {SCHEMA_NAME!r}")
    if document["mode"] not in MODES:
        problems.append(f"mode {document['mode']!r} is not one of {', '.join(MODES)}")
    if document["dry_run"] and document["hardware_measurement"]:
        problems.append("a dry run is marked as a hardware measurement")
    problems += _check_keys("environment", document["environment"], ENVIRONMENT)
    problems += _check_keys("summary", document["summary"], SUMMARY)
    names = []
    for index, stage in enumerate(document["stages"]):
        where = f"stages[{index}]"
        stage_problems = _check_keys(where, stage, STAGE)
        problems += stage_problems
        if stage_problems:
            continue
        names.append(stage["name"])
        if stage["name"] not in STAGES:
            problems.append(f"{where} names unknown stage {stage['name']!r}")
        if stage["status"] not in STATUSES:
            problems.append(f"{where} ({stage['name']}) has status {stage['status']!r}, not one of {', '.join(STATUSES)}")
        if stage["status"] != "ok" and not stage["reason"]:
            problems.append(f"{where} ({stage['name']}) is {stage['status']} without a reason")
    if len(set(names)) != len(names):
        problems.append(f"a stage is recorded twice: {names}")
    if names != [s for s in STAGES if s in names]:
        problems.append(f"stages are out of order: {names}")
    if isinstance(document["summary"], dict) and all(isinstance(s, dict) and "status" in s for s in document["stages"]):
        counted = {status: sum(1 for s in document["stages"] if s["status"] == status) for status in STATUSES}
        if counted != {k: document["summary"].get(k) for k in STATUSES}:
            problems.append(f"summary {document['summary']} does not count the stages ({counted})")
    return problems
