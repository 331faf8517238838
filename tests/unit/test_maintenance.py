"""Pure cores of daily maintenance: resources, cleanup selection, error grouping, trends."""

from __future__ import annotations

import pytest

from mlops.results import FAILED, OK, CheckResult
from tasks.maintenance.core import (
    Candidate,
    CleanupRules,
    FailedRun,
    MaintenanceReport,
    ResourceMinimums,
    group_failures,
    is_protected,
    merge_history,
    plan_cleanup,
    resource_shortfalls,
    utilization_trend,
)

GB = 1024**3


def test_resource_shortfalls_name_each_missing_resource() -> None:
    have = {"CPU": 2.0, "memory": 4 * GB, "object_store_memory": 1 * GB}
    assert resource_shortfalls(have, ResourceMinimums(cpus=2, memory_gb=4)) == []
    short = resource_shortfalls(have, ResourceMinimums(cpus=4, gpus=1, object_store_gb=2))
    assert [s.split()[0] for s in short] == ["CPU", "GPU", "object_store_gb"]


RULES = CleanupRules(tmp_days=1, ray_session_days=3, tune_results_days=14, inference_log_days=30)


def test_cleanup_takes_only_old_enough_unprotected_items() -> None:
    cands = [
        Candidate("/h/data/features/_tmp/abc", "tmp", 10, 2.0),
        Candidate("/h/data/features/_tmp/new", "tmp", 10, 0.1),  # too young
        Candidate("/tmp/ray/session_old", "ray_session", 100, 10.0),
        Candidate("/h/data/ray_results/hpo-aaaa-1", "tune_results", 50, 30.0),
        Candidate("/h/data/ray_results/hpo-champ-2", "tune_results", 50, 30.0),  # champion's HPO
        Candidate("/h/data/inference_log/date=2013-01-01", "inference_logs", 7, 40),
        Candidate("/h/mlartifacts/models/m-1", "tmp", 99, 100.0),  # holds champion's model
        Candidate("/h/data/curated/dims/s1", "tmp", 5, 100.0),  # a kept backup's source
    ]
    protected = ["file:///h/mlartifacts/models/m-1/artifacts", "/h/data/curated/dims/s1/w.pq"]
    plan = plan_cleanup(cands, RULES, protected, markers=["hpo-champ"], dry_run=True)
    doomed = {c.path for c in plan.doomed}
    assert doomed == {
        "/h/data/features/_tmp/abc",
        "/tmp/ray/session_old",
        "/h/data/ray_results/hpo-aaaa-1",
        "/h/data/inference_log/date=2013-01-01",
    }
    assert {c.path for c in plan.protected} == {
        "/h/data/ray_results/hpo-champ-2",
        "/h/mlartifacts/models/m-1",
        "/h/data/curated/dims/s1",
    }
    assert plan.bytes == 10 + 100 + 50 + 7 and plan.dry_run


@pytest.mark.parametrize(
    ("path", "protected", "expected"),
    [
        ("/a/b", ["/a/b"], True),
        ("/a", ["/a/b/c"], True),  # deleting /a would delete /a/b/c
        ("/a/b/c", ["/a/b"], True),
        ("/a/bc", ["/a/b"], False),  # a sibling with a common prefix
        ("/x", ["file:///x/"], True),
        ("/x", [""], False),
    ],
)
def test_protection_covers_ancestors_and_descendants(
    path: str, protected: list[str], expected: bool
) -> None:
    assert is_protected(path, protected) is expected


def test_failures_group_by_flow_and_first_error_line() -> None:
    runs = [
        FailedRun("training-pipeline", "Flow run encountered an exception.\ntrace", "FAILED", "1"),
        FailedRun("training-pipeline", "Flow run encountered an exception.\nother", "FAILED", "3"),
        FailedRun("training-pipeline", "quarantined 12% > 5%", "FAILED", "2"),
        FailedRun("backup", "", "CRASHED", "4"),
    ]
    groups = group_failures(runs)
    assert [(g.flow, g.count) for g in groups] == [
        ("training-pipeline", 2),
        ("backup", 1),
        ("training-pipeline", 1),
    ]
    assert (
        groups[0].first_line == "Flow run encountered an exception." and groups[0].last_seen == "3"
    )
    assert "crashed" in groups[1].first_line


def test_utilization_trend_against_previous_runs_and_idempotent_history() -> None:
    history = [
        {"run_date": "2013-06-01", "cpu_percent": 10.0, "disk_percent": 50.0},
        {"run_date": "2013-06-02", "cpu_percent": 30.0, "disk_percent": 52.0},
    ]
    now = {"run_date": "2013-06-03", "cpu_percent": 40.0, "disk_percent": 55.0, "note": "x"}
    assert utilization_trend(history, now) == {"cpu_percent": 20.0, "disk_percent": 4.0}
    assert utilization_trend([], now) == {}
    merged = merge_history(history, now)
    again = merge_history(merged, {**now, "cpu_percent": 1.0})  # re-running a day replaces it
    assert len(again) == 3 and again[-1]["cpu_percent"] == 1.0
    assert [h["run_date"] for h in merge_history(again, history[0], keep=2)] == [
        "2013-06-02",
        "2013-06-03",
    ]


def test_report_table_and_markdown_have_a_row_per_check() -> None:
    rows = (
        CheckResult("ray_resources", OK, "2 CPU", "fine"),
        CheckResult("serving", FAILED, "-", "a | b"),
    )
    report = MaintenanceReport("2013-06-03", rows)
    md = report.markdown().splitlines()
    assert md[2].startswith("| check | status") and len(md) == 4 + len(rows)
    assert "a \\| b" in md[-1]
    assert [c.name for c in report.failed] == ["serving"]
    assert len(report.table().splitlines()) == 1 + len(rows)
