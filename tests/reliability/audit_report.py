"""The verdict on a pip-audit JSON report (`make reliability` runs it after pip-audit):

    python -m tests.reliability.audit_report benchmarks/results/pip-audit.json

Exit 0 only when every installed package was audited and none has a known vulnerability. A
package pip-audit skipped is not a clean bill: when the vulnerability service cannot be reached
(a machine whose package index is a mirror without PyPI's per-version JSON API, say) pip-audit
skips every package and still says "No known vulnerabilities found"; this says how many it
could not audit and why, and fails. Editable installs (Flywheel itself) are not on PyPI and do
not count."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

EDITABLE = "distribution marked as editable"


@dataclass(frozen=True)
class Verdict:
    audited: int
    skipped: dict[str, str]  # package -> why pip-audit could not audit it
    vulnerable: dict[str, list[str]]  # package==version -> advisory ids

    @property
    def ok(self) -> bool:
        return self.audited > 0 and not self.skipped and not self.vulnerable

    def lines(self) -> list[str]:
        out = [
            f"pip-audit: {self.audited} packages audited, {len(self.skipped)} could not be, "
            f"{sum(len(v) for v in self.vulnerable.values())} known vulnerabilities"
        ]
        out += [f"  {pkg}: {', '.join(ids)}" for pkg, ids in sorted(self.vulnerable.items())]
        if self.skipped:
            reasons = Counter(why.split(":")[0] for why in self.skipped.values())
            example = next(iter(self.skipped.items()))
            out.append(
                "  not audited: "
                + "; ".join(f"{n} x {why}" for why, n in reasons.most_common())
                + f" (e.g. {example[0]}: {example[1]}); the vulnerability service was not "
                "reachable for them, so this is no clean bill: run `make reliability` where "
                "pypi.org's JSON API answers"
            )
        return out


def verdict(report: dict) -> Verdict:
    """What a pip-audit `--format json` report says, editable installs left out."""
    audited, skipped, vulnerable = 0, {}, {}
    for dep in report["dependencies"]:
        why = dep.get("skip_reason")
        if why is not None:
            if EDITABLE not in why:
                skipped[dep["name"]] = why
            continue
        audited += 1
        if dep.get("vulns"):
            vulnerable[f"{dep['name']}=={dep['version']}"] = [v["id"] for v in dep["vulns"]]
    return Verdict(audited, skipped, vulnerable)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"pip-audit wrote no report at {path}: see its output above")
        return 1
    result = verdict(json.loads(path.read_text(encoding="utf-8")))
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
