"""`sharpen doctor [JOB]`: run cluster/checks.py's checks and print a verdict per line (or JSON)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from cluster import checks as checks_module
from launcher.errors import UserError

TIMEOUT_VARIABLE, DEFAULT_TEST_TIMEOUT_S = checks_module.TIMEOUT_VARIABLE, checks_module.DEFAULT_TEST_TIMEOUT_S
VERDICTS = (checks_module.OK, checks_module.WARN, checks_module.FAIL, checks_module.SKIP)


def register(subparsers) -> None:
    """Add `sharpen doctor` to the `sharpen` subcommand parser."""
    p = subparsers.add_parser(
        "doctor", help="check this machine: versions, devices, rendezvous, an all-reduce test"
    )
    p.add_argument("job", nargs="?", help="the job file whose resources, SLURM settings and ranks to check")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a job key")
    p.add_argument("--master", metavar="HOST:PORT", help="node 0's rendezvous address: check it is reachable")
    p.add_argument("--json", action="store_true", help="print a JSON list of {check, verdict, detail}")


def run(args) -> int:
    """The command: 0 when no check FAILs, 1 when one does (a bad job file raises UserError: exit 2)."""
    spec = None
    if args.job:
        from launcher.jobfile import load_job

        spec = load_job(args.job, args.set)
    elif args.set:
        raise UserError("--set needs a job file: `sharpen doctor JOB.yaml --set KEY.PATH=VALUE`")
    master = parse_master(args.master) if args.master else None
    test_timeout_s = test_timeout()
    checks = []
    for check in checks_module.run_checks(spec, master, test_timeout_s, strategy_packages(spec)):
        checks.append(check)
        if not args.json:
            print(f"{check.verdict:<5} {check.check:<13} {check.detail}", flush=True)
    counts = {v: sum(c.verdict == v for c in checks) for v in VERDICTS}
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(", ".join(f"{n} {verdict}" for verdict, n in counts.items()))
    return 1 if counts[checks_module.FAIL] else 0


def strategy_packages(spec) -> tuple[str, ...]:
    """The modules the job's strategy needs beyond torch (none before `auto` has chosen one)."""
    from strategies import capabilities

    return () if spec is None or spec.strategy.name == "auto" else capabilities(spec.strategy.name).packages


def test_timeout() -> float:
    """Seconds the all-reduce test may take, start-up included, before it is stopped and FAILs."""
    value = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        return float(value) if value else DEFAULT_TEST_TIMEOUT_S
    except ValueError:
        raise UserError(f"{TIMEOUT_VARIABLE}={value!r}: expected a number of seconds") from None


def parse_master(master: str) -> tuple[str, int]:
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--master {master!r}: expected HOST:PORT, e.g. 10.0.0.1:29500")
    return host.strip("[]"), int(port)


COMMANDS = {"doctor": run}
