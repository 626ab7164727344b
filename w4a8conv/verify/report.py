"""verify's report, and running checks on threads with their problems in a fixed order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

_MAX_PROBLEMS = 50


@dataclass
class VerifyReport:
    ok: bool = True
    modules_checked: int = 0
    numeric_checks: int = 0
    modules_total: int = 0
    passthrough_checked: int = 0
    other_files_checked: int = 0  # config, tokenizer...: copied as they are
    files_hashed: int = 0
    manifest: bool = True  # False: converted with --no-checksums, so there are no sums to check
    problems: list[str] = field(default_factory=list)  # the first _MAX_PROBLEMS
    problems_total: int = 0

    def problem(self, message: str, first: bool = False) -> None:
        """Record a problem; ``first``: the cause of the others, said before them."""
        self.ok = False
        self.problems_total += 1
        if first:
            self.problems.insert(0, message)
            del self.problems[_MAX_PROBLEMS:]
        elif len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(message)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def in_order(pool: ThreadPoolExecutor, items: list, check: Callable, report: VerifyReport) -> Iterator:
    """Run ``check(item, found)`` for every item on ``pool``; yield the items in order, their problems reported.

    Each check collects into a report of its own, so the problems come out in the same order
    whatever the number of threads.
    """

    def run(item) -> list[str]:
        found = VerifyReport()
        check(item, found)
        return found.problems

    for item, problems in zip(items, pool.map(run, items), strict=True):
        for problem in problems:
            report.problem(problem)
        yield item
